"""Where a server process spends its time under the 64-client text load (py-spy).

    pip install py-spy && python bench/profile_text.py [--service ingrain-runner] [--seconds 8] [--top 15]

Starts the server as bench/throughput.py does, loads all-MiniLM-L6-v2, runs the load
generator (64 clients, one text per request) and meanwhile samples one process (the runner,
or ``--service ingrain-bento``: the first front worker) with ``py-spy record --gil
--threads`` (only the thread holding the GIL is sampled, so the shares say which Python code
keeps the others waiting). Prints the top entries by own time and by total time, and the
share of each thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, Server, loadgen, offline_workdir, place_minilm  # noqa: E402

WORK = offline_workdir("ingrain-profile-")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def summarize(raw: Path, top: int) -> None:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        samples += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    print(f"{samples} samples holding the GIL")
    for title, counter in (("thread", threads), ("own time", own), ("total time", total)):
        print(f"\n-- by {title}")
        for frame, n in counter.most_common(top):
            print(f"{n / samples * 100:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--service", default="ingrain-runner", choices=["ingrain-runner", "ingrain-bento"])
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    place_minilm()
    server = Server(WORK / "serve.log")
    try:
        server.post("/load_sentence_transformer_model", {"name": MINILM})
        texts = [f"text number {i} about the weather in town" for i in range(4096)]
        # Warm up first: a front worker opens the tokenizer (importing the library, seconds) on
        # its first request, which is not what the profile is for.
        loadgen(WORK, f"{server.url}/embed_text", [{"name": MINILM, "text": t} for t in texts[:256]], 64)
        payloads = WORK / "payloads.json"
        payloads.write_text(json.dumps([{"name": MINILM, "text": t} for t in texts]))
        load = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url",
                                 f"{server.url}/embed_text", "--payloads", str(payloads), "--concurrency", "64"],
                                stdout=subprocess.DEVNULL)
        time.sleep(1)  # the load is steady
        raw = WORK / "profile.txt"
        pid = server.service_pids(args.service)[0]
        subprocess.run(["py-spy", "record", "-p", str(pid), "-d", str(args.seconds), "-r", "250",
                        "--gil", "--threads", "-f", "raw", "-o", str(raw)], check=True, capture_output=True)
        load.wait()
        summarize(raw, args.top)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
