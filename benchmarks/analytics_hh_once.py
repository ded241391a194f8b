"""One federated heavy-hitters query, timed by wall clock and by CPU (all threads), for
comparing two source trees side by side (run it with each on PYTHONPATH, interleaved).

The setup is benchmarks/analytics.py's: tinyshakespeare split into ``--parties`` role
stretches, each party one privacy unit holding the words it uses at least 3 times (at most
10 per unit), keys up to 4 bytes. ``--profile`` prints cProfile tables of the coordinator
and of the LocalEngine node thread (which inflates both times).

  PYTHONPATH=src python benchmarks/analytics_hh_once.py --parties 1000 --epsilon 10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

from shoal.analytics import AnalyticsConfig, Party, Privacy, heavy_hitters
from shoal.analytics.simulate import federation
from shoal.data.text import split_roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parties", type=int, default=1000)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    corpus = Path(os.environ.get("SHOAL_DATA_DIR", Path(__file__).parents[2] / "shared/data"))
    path = corpus / "tinyshakespeare.txt"
    if not path.exists():
        path = Path("/work/shared/data/tinyshakespeare.txt")
    text = path.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for i, stretch in enumerate(split_roles(text, args.parties).values()):
            uses = Counter(re.findall(r"[a-z']+", stretch.lower()))
            often = {w: n for w, n in uses.items() if n >= 3}
            file = Path(tmp) / f"role{i}.csv"
            file.write_text(
                "role,word,uses\n" + "".join(f'{i},"{w}",{n}\n' for w, n in often.items())
            )
            members.append(Party(name=f"role{i}", path=str(file)))
        config = AnalyticsConfig(
            table="words",
            privacy_unit="role",
            max_contributions=10,
            parties=tuple(members),
            max_key_bytes=4,
            max_groups=64,
        )
        fed = federation(config, min_nodes=len(members) // 2)
        profiles = (cProfile.Profile(), cProfile.Profile()) if args.profile else None
        if profiles is not None:
            from shoal.runtime import app

            handle = app.NodeApp.handle

            def profiled(self: app.NodeApp, *a: object, **k: object) -> object:
                profiles[1].enable()
                try:
                    return handle(self, *a, **k)  # type: ignore[arg-type]
                finally:
                    profiles[1].disable()

            app.NodeApp.handle = profiled  # type: ignore[method-assign,assignment]
            profiles[0].enable()
        wall, cpu = time.perf_counter(), time.process_time()
        result = heavy_hitters(
            fed, "word", k=10, config=config, privacy=Privacy(epsilon=args.epsilon)
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if profiles is not None:
            profiles[0].disable()
        load = os.getloadavg()[0]
        print(
            f"wall {wall:.1f} s cpu {cpu:.1f} s load {load:.1f} top {[r[0] for r in result.rows]}"
        )
        for name, prof in zip(("coordinator", "node thread"), profiles or ()):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
            print(f"==== {name}\n{out.getvalue()}")


if __name__ == "__main__":
    main()
