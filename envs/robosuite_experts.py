"""Scripted experts for the robosuite tasks: feedback pick-and-place over the OSC_POSE controller.

Every expert is a *feedback* policy: `act(env)` reads the simulator (object poses, gripper pose,
finger opening, robosuite's contact-based grasp check) and computes the action from that alone,
so it can label any state, including states a learned policy reaches. Nothing carries over from
one call to the next; `reset()` exists for the interface.

A task is a list of pick-and-place stages (lift: one stage that only lifts; nut_assembly: two).
The first stage whose object is not yet placed (and released) is the active one; for it:

- object not grasped -> *pick*: move above the grasp point with the gripper's yaw aligned to the
  object's (mod its symmetry; for a nut, the finger orientation that leaves the wrist room to
  turn the nut on the way to its peg: a wrist wound up by the first nut otherwise blocks the
  second grasp or stretches the arm at the far peg), descend inside a funnel (the allowed height above the grasp point
  shrinks with the horizontal and yaw error), close when at the grasp point. Fingers closed on
  nothing -> open and rise (retry).
- object grasped -> *carry*: rise to a clearance height, move the object (not the hand) over its
  target with the object's yaw aligned to the target's, descend inside the same kind of funnel,
  open when the object is at its release point.
- every stage placed -> retreat upwards with the gripper open (success checks of nut assembly and
  pick-place want the hand away from the object).

Noise: `noisy(action)` adds seeded Gaussian noise of std `noise_std` to the executed position
deltas (the first 3 action dims); the clean `act` output is the label to store. With noise the
demonstrations leave the nominal path and the feedback brings them back (recoveries).

    python -m dopr.envs.measure_experts --task lift --episodes 100   # success rate of the expert
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dopr.envs.task_spec import TaskSpec

GRIP_OPEN, GRIP_CLOSE = -1.0, 1.0
POS_SCALE = 0.05  # m per unit action (robosuite's default OSC_POSE output_max)
ROT_SCALE = 0.5  # rad per unit action
POS_GAIN = 2.0
MAX_ROT_ACTION = 0.4
CARRY_SPEED = 0.5  # action units (x 0.05 m per step) while holding an object
HOVER = 0.15  # m above the grasp point while travelling (clears the 0.13 m tall pegs)
RETREAT_Z = 1.1  # m, world height the hand retreats to when done (tables are at ~0.8 m)
EMPTY_GRIP_WIDTH = 0.006  # finger opening (m) below which a closed gripper holds nothing
WRIST_MARGIN = 2.6  # rad, inside the Panda's joint 7 limit of 2.8973
# Panda with the hand pointing down: joint 7 ~ this + (hand azimuth around the base) - (hand yaw);
# measured 2.4 +- 0.4 rad over square and nut_assembly expert episodes
WRIST_YAW_OFFSET = 3 * math.pi / 4


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _turn_for_wrist(target: float, current: float, period: float, wrist_now: float,
                    base_turn: float) -> float:
    """Yaw change reaching target + k * period that leaves the wrist joint farthest from its limit.

    The gripper's yaw is about (joint 1) - (joint 7) + const, so turning the gripper by `turn`
    while the arm's base joint turns by `base_turn` moves joint 7 by base_turn - turn. Symmetric
    objects can be grasped at several yaws; this picks the one the wrist can reach comfortably.
    """
    nearest = (target - current + period / 2) % period - period / 2
    candidates = [nearest + k * period for k in range(-3, 4)
                  if abs(nearest + k * period) <= max(period / 2, 0.75 * math.pi)]
    turn = min(candidates or [nearest], key=lambda turn: abs(wrist_now + base_turn - turn))
    # never ask for more than the wrist can do (the goal is then only partly met, e.g. the round
    # nut's handle direction, which is a preference, not a requirement)
    wrist_after = np.clip(wrist_now + base_turn - turn, -WRIST_MARGIN, WRIST_MARGIN)
    return float(wrist_now + base_turn - wrist_after)


def _turn_for_grasp_and_carry(target: float, current: float, period: float, wrist_now: float,
                              base_turn_pick: float, base_turn_carry: float,
                              carry_turn: float) -> float:
    """Grasp yaw change (target + k * period) that leaves the wrist room for the carry as well.

    An object that must be turned on its way to the target (a nut whose handle should end up
    facing the robot) turns the wrist by another `carry_turn` after the grasp. Choosing the
    finger orientation only for the grasp can leave the wrist at its limit when the object has
    to turn; the carry then stops short of its yaw and the arm stretches to reach the far side
    of the peg. So pick the orientation whose worse wrist angle, at grasp or at placement, is
    the smallest (turns up to a bit over half a turn: an unwound wrist is worth the time).
    """
    nearest = (target - current + period / 2) % period - period / 2
    candidates = [nearest + k * period for k in range(-4, 5)
                  if abs(nearest + k * period) <= 1.1 * math.pi] or [nearest]

    def worst_wrist(turn):
        at_grasp = wrist_now + base_turn_pick - turn
        at_place = at_grasp + base_turn_carry - carry_turn
        return max(abs(at_grasp), abs(at_place)) + 0.05 * abs(turn)  # ties: the shorter turn

    turn = min(candidates, key=worst_wrist)
    # as in _turn_for_wrist, never ask for more than the wrist can do
    wrist_after = np.clip(wrist_now + base_turn_pick - turn, -WRIST_MARGIN, WRIST_MARGIN)
    return float(wrist_now + base_turn_pick - wrist_after)


def _yaw_of(mat: np.ndarray) -> float:
    """Yaw of a rotation's x axis in the world's horizontal plane."""
    return math.atan2(mat[1, 0], mat[0, 0])


def _quat_wxyz_to_mat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _rotvec(mat: np.ndarray) -> np.ndarray:
    """Axis-angle vector of a rotation matrix."""
    cos = np.clip((np.trace(mat) - 1) / 2, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([mat[2, 1] - mat[1, 2], mat[0, 2] - mat[2, 0], mat[1, 0] - mat[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-8:  # angle ~ pi: axis from the diagonal
        axis = np.sqrt(np.clip((np.diag(mat) + 1) / 2, 0, None))
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def _down_with_yaw(yaw: float) -> np.ndarray:
    """Gripper pointing straight down with its finger axis (site x) at `yaw`."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


@dataclass
class Stage:
    """One pick-and-place: what to grasp, where to put it, and when it counts as placed.

    grasp(env) -> (grip site target position, grasp yaw (None: any), yaw symmetry period)
    place(env) -> (object target position at release, object yaw goal, clearance z for the
                   object while carrying). The yaw goal is None (any yaw) or (yaw, symmetry
                   period): among equivalent yaws the one easiest on the wrist is taken.
    placed(env) -> bool, the object is where the task wants it (checked with the hand open).
    """

    body: str  # the object's MuJoCo body name
    geoms: object  # what robosuite's _check_grasp takes for this object
    grasp: Callable
    place: Callable
    placed: Callable
    release_tolerance: tuple[float, float] = (0.01, 0.015)  # xy, z (m) of the object at release
    # m of height allowed above the grasp point per m of horizontal error on the way down
    pick_funnel: float = 4.0
    # choose the grasp yaw so that the wrist can still make the carry's object turn
    plan_carry_wrist: bool = False


class ScriptedExpert:
    """Feedback pick-and-place expert over a list of stages (see the module docstring)."""

    def __init__(self, stages: Callable[[object], list[Stage]], seed: int | None = None,
                 noise_std: float = 0.0):
        self._build_stages = stages
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Nothing is cached between calls; kept for the expert interface."""

    def noisy(self, action: np.ndarray) -> np.ndarray:
        """The action to execute: seeded Gaussian noise on the position deltas, clipped."""
        if self.noise_std <= 0:
            return action
        executed = np.array(action, dtype=np.float64)
        executed[:3] += self.noise_std * self.rng.standard_normal(3)
        return np.clip(executed, -1.0, 1.0)

    # --- the policy ----------------------------------------------------------------------------
    def act(self, env) -> np.ndarray:
        env = getattr(env, "unwrapped", env)
        rs = env.robosuite_env
        sim = env.sim
        gripper = rs.robots[0].gripper["right"]
        site = rs.robots[0].eef_site_id["right"]
        eef = np.array(sim.data.site_xpos[site])
        eef_mat = np.array(sim.data.site_xmat[site]).reshape(3, 3)
        qpos = sim.data.qpos[rs.robots[0]._ref_gripper_joint_pos_indexes["right"]]
        width = float(qpos[0] - qpos[1])

        for stage in self._build_stages(rs):
            grasped = bool(rs._check_grasp(gripper=gripper, object_geoms=stage.geoms))
            if grasped or not stage.placed(rs):
                break
        else:  # everything placed and released: get the hand out of the way
            target = np.array([eef[0], eef[1], max(eef[2], RETREAT_Z)])
            return self._action(eef, eef_mat, target, 0.0, GRIP_OPEN)

        robot = rs.robots[0]
        self._wrist = float(sim.data.qpos[robot._ref_joint_pos_indexes[-1]])
        base_body = sim.model.body_name2id(robot.robot_model.root_body)
        self._base = np.array(sim.data.body_xpos[base_body])
        if grasped:
            return self._carry(rs, sim, stage, eef, eef_mat)
        return self._pick(rs, stage, eef, eef_mat, width)

    def _base_turn(self, start: np.ndarray, goal: np.ndarray) -> float:
        """How much the arm's base joint turns when the hand moves from start to goal."""
        a = math.atan2(start[1] - self._base[1], start[0] - self._base[0])
        b = math.atan2(goal[1] - self._base[1], goal[0] - self._base[0])
        return _wrap(b - a)

    def _pick(self, rs, stage: Stage, eef, eef_mat, width) -> np.ndarray:
        grasp_pos, obj_yaw, period = stage.grasp(rs)
        turn = 0.0  # rotationally symmetric objects are grasped at any yaw
        if obj_yaw is not None and stage.plan_carry_wrist:
            turn = self._grasp_turn_for_carry(rs, stage, eef, eef_mat, grasp_pos, obj_yaw, period)
        elif obj_yaw is not None:
            turn = _turn_for_wrist(obj_yaw, _yaw_of(eef_mat), period, self._wrist,
                                   self._base_turn(eef, grasp_pos))
        xy_err = float(np.linalg.norm(grasp_pos[:2] - eef[:2]))
        if width < EMPTY_GRIP_WIDTH and eef[2] < grasp_pos[2] + 0.07:
            # closed on nothing: open and back off upwards, then try again
            target = np.array([eef[0], eef[1], grasp_pos[2] + 0.08])
            return self._action(eef, eef_mat, target, turn, GRIP_OPEN)
        allowed = min(HOVER, stage.pick_funnel * max(0.0, xy_err - 0.004)
                      + 0.2 * max(0.0, abs(turn) - 0.05))
        target_z = grasp_pos[2] + allowed
        if xy_err > 0.02 and eef[2] < target_z - 0.02:
            target = np.array([eef[0], eef[1], target_z])  # rise before moving sideways
        else:
            target = np.array([grasp_pos[0], grasp_pos[1], target_z])
        at_grasp = xy_err < 0.01 and eef[2] - grasp_pos[2] < 0.01 and abs(turn) < 0.1
        return self._action(eef, eef_mat, target, turn, GRIP_CLOSE if at_grasp else GRIP_OPEN)

    def _grasp_turn_for_carry(self, rs, stage: Stage, eef, eef_mat, grasp_pos, grasp_yaw,
                              period) -> float:
        """Grasp turn chosen with the carry's object turn in view (_turn_for_grasp_and_carry)."""
        goal, goal_yaw, _ = stage.place(rs)
        obj = _body_pos(rs, stage.body)
        carry_turn = 0.0
        hand_offset = grasp_pos[:2] - obj[:2]
        if goal_yaw is not None:
            obj_yaw = _body_yaw(rs, stage.body)
            carry_turn = (goal_yaw[0] - obj_yaw + goal_yaw[1] / 2) % goal_yaw[1] - goal_yaw[1] / 2
            c, s = math.cos(carry_turn), math.sin(carry_turn)
            hand_offset = np.array([[c, -s], [s, c]]) @ hand_offset
        hand_at_place = np.r_[goal[:2] + hand_offset, goal[2]]
        # The wrist angle that the arm's current pose actually gives drifts with the other joints
        # (the OSC spreads a yaw turn over several of them), so predictions from it flip the
        # choice back and forth while the hand turns. Predict from the nominal relation instead;
        # it depends only on where the hand is going, so the choice stays put.
        yaw_now = _yaw_of(eef_mat)
        azimuth = math.atan2(eef[1] - self._base[1], eef[0] - self._base[0])
        nominal_wrist = self._wrist - _wrap(yaw_now + self._wrist - azimuth - WRIST_YAW_OFFSET)
        return _turn_for_grasp_and_carry(grasp_yaw, yaw_now, period, nominal_wrist,
                                     self._base_turn(eef, grasp_pos),
                                     self._base_turn(grasp_pos, hand_at_place), carry_turn)

    def _carry(self, rs, sim, stage: Stage, eef, eef_mat) -> np.ndarray:
        body = sim.model.body_name2id(stage.body)
        obj = np.array(sim.data.body_xpos[body])
        goal, goal_yaw, clearance_z = stage.place(rs)
        turn = 0.0
        if goal_yaw is not None:  # turn the hand by what the object still has to turn
            obj_yaw = _yaw_of(_quat_wxyz_to_mat(sim.data.body_xquat[body]))
            turn = _turn_for_wrist(goal_yaw[0], obj_yaw, goal_yaw[1], self._wrist,
                                   self._base_turn(obj, goal))
        xy_err = float(np.linalg.norm(goal[:2] - obj[:2]))
        tol_xy, tol_z = stage.release_tolerance
        # steep funnel: the object goes down only when it is nearly over its goal (a nut must
        # meet its peg within a few millimetres)
        allowed = 20.0 * max(0.0, xy_err - tol_xy / 2) + 0.3 * max(0.0, abs(turn) - 0.03)
        obj_target_z = min(clearance_z, goal[2] + allowed)
        if xy_err > 2 * tol_xy and obj[2] < clearance_z - 0.02:
            obj_target = np.array([obj[0], obj[1], clearance_z])  # rise before moving sideways
        else:
            obj_target = np.array([goal[0], goal[1], obj_target_z])
        release = xy_err < tol_xy and obj[2] - goal[2] < tol_z and abs(turn) < 0.1
        target = eef + (obj_target - obj)
        # slower with a load: a heavy nut overshooting the far pegs straightens the elbow, and
        # OSC_POSE cannot leave that singular pose
        return self._action(eef, eef_mat, target, turn, GRIP_OPEN if release else GRIP_CLOSE,
                            max_speed=CARRY_SPEED)

    @staticmethod
    def _action(eef, eef_mat, target, turn, grip, max_speed: float = 1.0) -> np.ndarray:
        """Move the grip site toward `target`, keep the hand pointing down, turn yaw by `turn`."""
        # OSC_POSE's goal is "here + delta" with a stiffness of 150 N/m: a delta equal to the
        # position error cannot hold a payload up, so command twice the error (speed still capped)
        delta = POS_GAIN * (np.asarray(target) - eef) / POS_SCALE
        norm = np.linalg.norm(delta)
        if norm > max_speed:  # keep the direction, cap the speed
            delta = delta * (max_speed / norm)
        # tilt back to vertical at the current yaw, plus a yaw turn about the world z axis; kept
        # apart so that large turns do not hit the axis-angle ambiguity near pi
        rot = _rotvec(_down_with_yaw(_yaw_of(eef_mat)) @ eef_mat.T) + np.array([0.0, 0.0, turn])
        # slow turns: fast yaw commands let the OSC tilt the hand and fold the wrist
        rot = np.clip(rot / ROT_SCALE, -MAX_ROT_ACTION, MAX_ROT_ACTION)
        return np.concatenate([delta, rot, [grip]]).astype(np.float64)


# --- the tasks -----------------------------------------------------------------------------------
def _body_pos(rs, name):
    return np.array(rs.sim.data.body_xpos[rs.sim.model.body_name2id(name)])


def _body_yaw(rs, name):
    return _yaw_of(_quat_wxyz_to_mat(rs.sim.data.body_xquat[rs.sim.model.body_name2id(name)]))


# Cubes: the open fingers clear a 4 cm cube by only 2 cm on each side, so the hand comes down
# only when nearly centred (a gentler funnel left a finger resting on the cube's top in 6 of 100
# Stack episodes). The nut handles need the gentler default (measured: the steep one lost Square
# episodes).
CUBE_PICK_FUNNEL = 10.0


def _lift_stages(rs) -> list[Stage]:
    cube = rs.cube.root_body
    lift_z = rs.table_offset[2] + 0.12
    return [Stage(
        body=cube,
        geoms=rs.cube,
        grasp=lambda rs: (_body_pos(rs, cube), _body_yaw(rs, cube), math.pi / 2),
        # keep the cube where it is in the plane, only raise it: never "placed", hold it up
        place=lambda rs: (np.r_[_body_pos(rs, cube)[:2], lift_z], None, lift_z),
        placed=lambda rs: False,
        release_tolerance=(-1.0, -1.0),  # never release
        pick_funnel=CUBE_PICK_FUNNEL,
    )]


def _can_stages(rs) -> list[Stage]:
    can = rs.objects[rs.object_to_id["can"]]
    body, obj_id = can.root_body, rs.object_to_id["can"]
    # The can's quadrant of bin 2 (robosuite's not_in_bin): aim near its corner closest to the
    # robot, since its centre lies at the edge of the Panda's reach.
    x_low = rs.bin2_pos[0] - (rs.bin_size[0] / 2 if obj_id in (0, 2) else 0.0)
    y_low = rs.bin2_pos[1] - (rs.bin_size[1] / 2 if obj_id < 2 else 0.0)
    target = np.array([x_low + 0.06, y_low + 0.07])
    bin_z = rs.bin2_pos[2]
    return [Stage(
        body=body,
        geoms=can,
        grasp=lambda rs: (_body_pos(rs, body) + np.array([0, 0, 0.01]), None, 2 * math.pi),
        place=lambda rs: (np.array([target[0], target[1], bin_z + 0.09]), None, bin_z + 0.2),
        placed=lambda rs: not rs.not_in_bin(_body_pos(rs, body), obj_id),
        release_tolerance=(0.03, 0.03),
    )]


def _nut_stage(rs, nut_index: int) -> Stage:
    nut = rs.nuts[nut_index]
    body = nut.root_body
    handle = nut.important_sites["handle"]
    peg_body = rs.peg1_body_id if nut_index == 0 else rs.peg2_body_id
    square = "square" in nut.name.lower()
    table_z = rs.table_offset[2]

    def grasp(rs):
        center = _body_pos(rs, body)
        handle_pos = np.array(rs.sim.data.site_xpos[rs.sim.model.site_name2id(handle)])
        radial = math.atan2(handle_pos[1] - center[1], handle_pos[0] - center[0])
        # fingers close across the handle: finger axis perpendicular to the handle's length
        return handle_pos, radial + math.pi / 2, math.pi

    def place(rs):
        # The pegs are at the edge of the Panda's reach: bring the nut with its handle (where the
        # hand is) pointing back at the robot, which keeps the elbow away from full extension.
        # The square nut fits the axis-aligned square peg at body yaws k * 90 degrees.
        peg = np.array(rs.sim.data.body_xpos[peg_body])
        center = _body_pos(rs, body)
        handle_pos = np.array(rs.sim.data.site_xpos[rs.sim.model.site_name2id(handle)])
        handle_offset = math.atan2(handle_pos[1] - center[1], handle_pos[0] - center[0]) \
            - _body_yaw(rs, body)
        base = _body_pos(rs, rs.robots[0].robot_model.root_body)
        toward_base = math.atan2(base[1] - peg[1], base[0] - peg[0])
        goal_yaw = toward_base - handle_offset
        if square:
            goal_yaw = min((k * math.pi / 2 for k in range(4)),
                           key=lambda yaw: abs(_wrap(yaw - goal_yaw)))
        return (np.array([peg[0], peg[1], table_z + 0.03]), (goal_yaw, 2 * math.pi),
                table_z + 0.17)

    return Stage(
        body=body,
        geoms=nut,
        grasp=grasp,
        place=place,
        placed=lambda rs: rs.on_peg(_body_pos(rs, body), nut_index),
        release_tolerance=(0.006, 0.02),
        plan_carry_wrist=True,
    )


def _square_stages(rs) -> list[Stage]:
    return [_nut_stage(rs, 0)]


def _nut_assembly_stages(rs) -> list[Stage]:
    return [_nut_stage(rs, 0), _nut_stage(rs, 1)]


def _stack_stages(rs) -> list[Stage]:
    a, b = rs.cubeA.root_body, rs.cubeB.root_body
    rest = rs.cubeA.size[2] + rs.cubeB.size[2]

    def placed(rs):
        pa, pb = _body_pos(rs, a), _body_pos(rs, b)
        return bool(rs.check_contact(rs.cubeA, rs.cubeB)) and pa[2] > pb[2] + 0.5 * rest

    return [Stage(
        body=a,
        geoms=rs.cubeA,
        grasp=lambda rs: (_body_pos(rs, a), _body_yaw(rs, a), math.pi / 2),
        place=lambda rs: (_body_pos(rs, b) + np.array([0, 0, rest + 0.005]),
                          (_body_yaw(rs, b), math.pi / 2), _body_pos(rs, b)[2] + rest + 0.06),
        placed=placed,
        release_tolerance=(0.008, 0.012),
        pick_funnel=CUBE_PICK_FUNNEL,
    )]


STAGES = {
    "lift": _lift_stages,
    "can": _can_stages,
    "square": _square_stages,
    "stack": _stack_stages,
    "nut_assembly": _nut_assembly_stages,
}


def make_robosuite_expert(spec: TaskSpec, seed: int | None = None,
                          noise_std: float = 0.0) -> ScriptedExpert:
    if spec.name not in STAGES:
        raise ValueError(f"no scripted expert for robosuite task {spec.name!r}; "
                         f"known: {sorted(STAGES)}")
    return ScriptedExpert(STAGES[spec.name], seed=seed, noise_std=noise_std)
