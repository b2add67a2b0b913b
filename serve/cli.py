"""``lstm-cpu serve``: deploy a model on a local Ray instance or an existing cluster."""

import ipaddress
import sys
import time

import lstm_cpu

#: Application name and route prefix of the service ``lstm-cpu serve`` deploys.
APP_NAME = "lstm"


def serve_command(args) -> int:
    load_options = {k: getattr(args, k) for k in ("prefix", "node") if getattr(args, k, None)}
    lstm_cpu.load(args.model, **load_options).stream()  # a bad file fails before Ray starts
    import ray
    from ray import serve

    from .app import app

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.stderr.write(f"lstm-cpu: note: serving on {args.host}: the service has no "
                         f"authentication or TLS; put it behind a gateway you trust\n")
    ray.init(address=args.address) if args.address else ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app(args.model, replicas=args.replicas, checkpoint_every=args.checkpoint_every,
                  idle_timeout_s=args.idle_timeout, **load_options),
              name=APP_NAME, route_prefix="/")
    print(f"lstm-cpu: serving {args.model} with {args.replicas} replicas: "
          f"ws://{args.host}:{args.port}/streams/ws, "
          f"POST http://{args.host}:{args.port}/streams/ID/step; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if args.address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()
    return 0
