"""`dopr serve CKPT --port P [--protocol openpi]`: a websocket policy server (msgpack + numpy arrays)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint or exported policy file over websockets",
        description="Serve a policy: on connect the server sends its metadata (observation keys, shapes, dtypes, "
        "action size, To/Ta, control rate); each request is an observation dict {key: (To, ...) or (B, To, ...)} "
        "and the reply holds the action chunk (Ta, A) or (B, Ta, A). Bad requests get an error reply and the "
        "server keeps serving. Client: dopr.deploy.client.PolicyClient. With --protocol openpi it speaks openpi's "
        "variant, for openpi-client's WebsocketClientPolicy: one step per key (the server keeps each connection's "
        "history; {'endpoint': 'reset'} or a new connection starts an episode), lossless dtype casts plus "
        "float64 -> float32, the chunk as 'actions' (and 'action'), errors as text frames with the traceback. "
        "GET /healthz answers OK.",
    )
    p.add_argument("policy", help="checkpoint folder, or a .pt/.onnx file from `dopr export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise of generative policies")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: library default)")
    p.add_argument("--no-ema", action="store_true", help="serve model.safetensors instead of the EMA weights")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (checkpoint folders only)")
    p.add_argument("--protocol", choices=["native", "openpi"], default="native",
                   help="native (default): (To, ...) history per request, 'action' reply; openpi: openpi-client's "
                   "protocol (see above)")
    p.add_argument("--rename", action="append", default=[], metavar="CLIENT_KEY=POLICY_KEY",
                   help="openpi only: take the client's key as the policy's observation key, e.g. "
                   "observation/state=robot0_eef_pos (repeatable)")
    p.set_defaults(func=main)


def main(args) -> int:
    import logging
    import sys

    from dopr.deploy.load import load_model
    from dopr.deploy.openpi import parse_renames
    from dopr.deploy.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        model = load_model(args.policy, ema=not args.no_ema, seed=args.seed, num_threads=args.threads,
                           num_inference_steps=args.steps)
        server = PolicyServer(model, model.meta, host=args.host, port=args.port, protocol=args.protocol,
                              renames=parse_renames(args.rename))
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:  # CheckpointError is a RuntimeError
        print(f"dopr serve: error: {err}", file=sys.stderr)
        return 2
    meta = model.meta
    # flush: a parent process (tests, supervisors) reads the port from this line
    print(f"serving ({args.protocol} protocol) {meta['policy']} policy for task {meta['task']} on "
          f"ws://{args.host}:{server.port} "
          f"(obs {meta['obs_keys']}, To={meta['n_obs_steps']}, Ta={meta['n_action_steps']}, "
          f"A={meta['action_dim']})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
