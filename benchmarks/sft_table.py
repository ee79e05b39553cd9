"""Write docs/sft_checkpoint.md from `unigrpo eval ... --mode all --out DIR` results.

    unigrpo eval builtin:pretrain --checkpoint runs/pretrain/tiny_sft.safetensors --mode all --out runs/pretrain/eval
    python benchmarks/sft_table.py runs/pretrain/eval
"""

import json
import shutil
import sys
from pathlib import Path

from unigrpo.tasks.shapes import format_table

NAMES = {"think": "(a) own reasoning", "no_think": "(b) no reasoning", "gt": "(c) ground-truth reasoning"}


def main(eval_dir: str, out: str = "docs/sft_checkpoint.md") -> None:
    src, docs = Path(eval_dir), Path(out).parent
    r = {NAMES[m]: json.loads((src / f"{m}.json").read_text()) for m in NAMES}
    for m in NAMES:
        shutil.copy(src / f"{m}.png", docs / "assets" / f"sft_{m}.png")
    a, b, c = (r[NAMES[m]] for m in NAMES)
    template = (Path(__file__).with_name("sft_checkpoint_template.md")).read_text()
    text = template.format(
        acc=format_table(r), score=format_table(r, metric="score"),
        samples=(src / "think_samples.md").read_text(),
        a_r=a["accuracy_reasoning"], b_r=b["accuracy_reasoning"], c_r=c["accuracy_reasoning"],
        c_all=c["accuracy"], c_pos=c["categories"]["position"]["accuracy"], n=a["n"])
    Path(out).write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
