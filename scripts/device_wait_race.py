"""Why device-wait kernels are chained (CUDA): N layers' waiting kernels whose ids are
constants (routing that reads no hidden state, as the bench's table routers), evaluated at
once, each asking for an absent expert. With --no-chain they share no buffer, MLX's CUDA graph
may start them together, and the one mailbox loses requests (kernels give up after ~10 s).

    python scripts/device_wait_race.py [--layers 8] [--no-chain]"""
import argparse
import sys

sys.path.insert(0, ".")
from chronos_mlx import wait_kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-chain", action="store_true", help="kernels do not read the one before them")
    args = ap.parse_args()
    if not wait_kernels.available():
        sys.exit("needs MLX's CUDA backend")
    r = wait_kernels.ask_in_turn(args.layers, chain=not args.no_chain)
    print(f"{'unchained' if args.no_chain else 'chained'}: {len(r['asked'])} of {args.layers} requests answered "
          f"(order {r['asked']}), a kernel gave up: {r['gave_up']}, slots right: {r['slots_right']}, {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
