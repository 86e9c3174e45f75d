"""Offscreen rendering setup: pick a MuJoCo OpenGL backend before mujoco/robosuite is imported.

MuJoCo reads MUJOCO_GL once, when `import mujoco` loads its GL context module (robosuite does the
same in robosuite.utils.binding_utils), so the backend must be chosen before that first import:

- MUJOCO_GL already set by the user: kept as it is.
- an NVIDIA device visible (/dev/nvidia0): "egl" (hardware rendering on GPU machines).
- otherwise, libOSMesa installed: "osmesa" (software rendering on CPU machines).
  On Debian/Ubuntu the package is `libosmesa6` (apt-get install -y libosmesa6).
- otherwise: left unset. Low-dimensional tasks need no renderer at all; asking for image
  observations then fails with `RenderingUnavailable`, which says what to install or set.

`offscreen_rendering_error()` tries a real 8x8 render and returns None or the reason it failed;
tests use it to skip image tests with that reason, and `dopr eval --videos` to refuse at once
(rather than finish without the videos it was asked for).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import warnings

INSTALL_HINT = (
    "On a GPU machine set MUJOCO_GL=egl (needs the NVIDIA driver's libEGL); on a CPU machine "
    "install OSMesa (Debian/Ubuntu: apt-get install -y libosmesa6) and set MUJOCO_GL=osmesa. "
    "Set it before mujoco or robosuite is imported (dopr.envs does this when it is imported first)."
)


class RenderingUnavailable(RuntimeError):
    """Image observations were requested but no offscreen OpenGL backend works here."""


def choose_gl_backend() -> str | None:
    """The MUJOCO_GL value this machine should use, or None when none is known to work."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    if os.path.exists("/dev/nvidia0"):
        return "egl"
    if ctypes.util.find_library("OSMesa"):
        return "osmesa"
    return None


def configure_gl_backend() -> str | None:
    """Set MUJOCO_GL (and PyOpenGL's platform to match) if mujoco's GL layer is not loaded yet.

    Returns the backend in effect. Safe to call many times; a no-op once mujoco has chosen.
    """
    if "mujoco" in sys.modules:  # mujoco >= 3 picks its GL context when it is imported
        return os.environ.get("MUJOCO_GL")
    backend = choose_gl_backend()
    if backend and not os.environ.get("MUJOCO_GL"):
        os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa") and not os.environ.get("PYOPENGL_PLATFORM"):
        os.environ["PYOPENGL_PLATFORM"] = backend
    return backend


_render_error_cache: list[str | None] = []


def offscreen_rendering_error() -> str | None:
    """None when a tiny offscreen render succeeds, else why it failed and what to do."""
    if not _render_error_cache:
        configure_gl_backend()
        # A failed backend warns (GLFW: no DISPLAY) and its half-built Renderer raises again in __del__:
        # the returned reason says it all, so the probe keeps that noise off the user's terminal.
        hook = sys.unraisablehook
        sys.unraisablehook = lambda _: None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _render_error_cache.append(_try_offscreen_render())
        finally:
            sys.unraisablehook = hook
    return _render_error_cache[0]


def _try_offscreen_render() -> str | None:
    backend = os.environ.get("MUJOCO_GL")
    try:
        import mujoco

        # the backend mujoco chose at import (robosuite may rewrite MUJOCO_GL afterwards)
        from mujoco.rendering.classic import gl_context

        backend = getattr(gl_context, "_MUJOCO_GL", backend)

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody/></mujoco>")
        renderer = mujoco.Renderer(model, 8, 8)
        renderer.update_scene(mujoco.MjData(model))
        renderer.render()
        renderer.close()
    except Exception as err:  # the backends raise assorted OpenGL/EGL/import errors
        return (f"offscreen rendering failed with MUJOCO_GL={backend!r} "
                f"({type(err).__name__}: {err}). {INSTALL_HINT}")
    return None


def require_offscreen_rendering(purpose: str = "image observations") -> None:
    """Raise RenderingUnavailable with instructions unless offscreen rendering works."""
    error = offscreen_rendering_error()
    if error is not None:
        raise RenderingUnavailable(f"{purpose} need offscreen rendering: " + error)
