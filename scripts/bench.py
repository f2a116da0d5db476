"""The benchmark grid (layout x packing, real DPO steps): `python scripts/bench.py --help`.

    python scripts/bench.py                          # CPU default: model=tiny, 160 HH-RLHF rows
    python scripts/bench.py --big                    # a ~50M-parameter Llama on 48 rows
    python scripts/bench.py trainer=gpu model.attention=flex dataset.num_rows=512   # on a GPU

Writes outputs/bench/{bench.json, bench.md, bench.png}; see ppo_train/bench.py for the method.
"""

from ppo_train.bench import main

if __name__ == "__main__":
    main()
