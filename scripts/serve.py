"""`dopr serve CKPT --port P`: a websocket policy server (msgpack + numpy arrays, openpi's protocol)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint or exported policy file over websockets",
        description="Serve a policy: on connect the server sends its metadata (observation keys, shapes, dtypes, "
        "action size, To/Ta, control rate); each request is an observation dict {key: (To, ...) or (B, To, ...)} "
        "and the reply holds the action chunk (Ta, A) or (B, Ta, A). Bad requests get an error reply and the "
        "server keeps serving. Client: dopr.deploy.client.PolicyClient.",
    )
    p.add_argument("policy", help="checkpoint folder, or a .pt/.onnx file from `dopr export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise of generative policies")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: library default)")
    p.add_argument("--no-ema", action="store_true", help="serve model.safetensors instead of the EMA weights")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (checkpoint folders only)")
    p.set_defaults(func=main)


def main(args) -> int:
    import logging
    import sys

    from dopr.deploy.load import load_model
    from dopr.deploy.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        model = load_model(args.policy, ema=not args.no_ema, seed=args.seed, num_threads=args.threads,
                           num_inference_steps=args.steps)
        server = PolicyServer(model, model.meta, host=args.host, port=args.port)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:  # CheckpointError is a RuntimeError
        print(f"dopr serve: error: {err}", file=sys.stderr)
        return 2
    meta = model.meta
    # flush: a parent process (tests, supervisors) reads the port from this line
    print(f"serving {meta['policy']} policy for task {meta['task']} on ws://{args.host}:{server.port} "
          f"(obs {meta['obs_keys']}, To={meta['n_obs_steps']}, Ta={meta['n_action_steps']}, "
          f"A={meta['action_dim']})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
