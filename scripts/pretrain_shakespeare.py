#!/usr/bin/env python
"""Pre-trains a character-level transformer base on the Shakespeare plays kept for pre-training.

The recipe a config names as ``model.kwargs.base = "shakespeare:STEPS:HELD_OUT"``
(``fedjax_sim.pretrain.shakespeare_base``), run ahead of time: it trains the base on every play
but the last ``--held_out_plays`` and caches it where a run looks for it (a run that finds no
cached base trains it itself first). ``--out`` also writes it as a GPT-2-layout safetensors
file, which ``model.kwargs.base`` then takes as a path.

    python scripts/pretrain_shakespeare.py --steps 2000     # configs/shakespeare_lora.py's base
    python scripts/pretrain_shakespeare.py --steps 100 --num_layers 2 --width 64    # its smoke
"""

from __future__ import annotations

import argparse
import sys
import time

from fedjax_sim import pretrain
from fedjax_sim.models import lora


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--held_out_plays", type=int, default=10)
    p.add_argument("--out", default="", help="also write a GPT-2-layout .safetensors file")
    args = p.parse_args(argv)
    arch = {
        "input_shape": (args.context,),
        "num_layers": args.num_layers,
        "width": args.width,
        "num_heads": args.num_heads,
    }
    t0 = time.perf_counter()
    params = pretrain.recipe_base(f"shakespeare:{args.steps}:{args.held_out_plays}", arch)
    print(f"base ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        lora.write_gpt2(args.out, params)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
