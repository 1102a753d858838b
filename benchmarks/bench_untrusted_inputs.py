"""Peak memory (`/usr/bin/time -v`) of the inputs issue 25 found expensive: a huge caption, a decompression bomb.

    python benchmarks/bench_untrusted_inputs.py --case caption --caption-mb 10 [--src OTHER/src]
    python benchmarks/bench_untrusted_inputs.py --case png --rows 4 [--decode-threads 4] [--src OTHER/src]

`caption`: `protorkd train` (the default MiniLM text teacher, tiny student, one epoch) on 32 demo rows, one of
whose captions is `--caption-mb` MB long. `png`: `protorkd gather-cc` of `--rows` URLs that all serve one
9000 x 9000 (81 MP) PNG of a single colour, about 240 kB, from a local server. `--src` runs another checkout's
code (e.g. the commit before a change: `git archive COMMIT | tar -x -C /tmp/base`) with the same interpreter, so
the two are measured side by side. Prints the command's exit code, wall time and maximum resident set size.
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench_demo import cpu_model
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def measured(command: list[str], src: Path, cwd: Path) -> dict:
    """Run `command` under /usr/bin/time -v with `src` first on the path; exit code, wall seconds, max RSS MB."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    report = result.stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", report).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) / 1024
    code = re.search(r"Exit status: (\d+)", report)
    tail = [line for line in report.splitlines() if "|" in line or "error" in line.lower()][-3:]
    exit_code = int(code.group(1)) if code else result.returncode
    return {"exit": exit_code, "seconds": seconds, "max_rss_mb": rss, "tail": tail}


def caption_case(work: Path, src: Path, megabytes: float) -> dict:
    sys.path.insert(0, str(src))
    from protorkd.data.demo import write_demo_corpus

    corpus = write_demo_corpus(work / "corpus", size=32, seed=1, eval_per_class=1, progress=False)
    lines = (corpus / "train.tsv").read_text().splitlines()
    image = lines[1].split("\t")[0]
    lines[1] = f"{image}\t" + ("a red circle " * int(megabytes * 2**20 / 13 + 1))[: int(megabytes * 2**20)]
    (corpus / "train.tsv").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "protorkd", "train", "--train-data", str(corpus / "train.tsv")]
    command += ["--image-model", "micro-cnn", "--batch-size", "16", "--epochs", "1", "--workers", "0"]
    command += ["--report-to", "", "--logs", str(work / "logs"), "--name", "run"]
    command += ["--zeroshot-frequency", "0", "--linear-frequency", "0", "--retrieval-frequency", "0"]
    return measured(command, src, work)


def png_case(work: Path, src: Path, rows: int, decode_threads: int | None) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (9000, 9000), (200, 30, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    (work / "cc.tsv").write_text("".join(f"bomb {i}\thttp://127.0.0.1:{port}/{i}.png\n" for i in range(rows)))
    command = [sys.executable, "-m", "protorkd", "gather-cc", str(work / "cc.tsv"), "--out", str(work / "out")]
    command += ["--allow-private-hosts"]
    if decode_threads:
        command += ["--decode-threads", str(decode_threads)]
    try:
        return {**measured(command, src, work), "png_bytes": len(data)}
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("caption", "png"), required=True)
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the protorkd source folder to run")
    parser.add_argument("--caption-mb", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--decode-threads", type=int, default=None)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.python_version()}; load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.case == "caption":
            result = caption_case(work, args.src, args.caption_mb)
            what = f"train, one caption of {args.caption_mb:g} MB"
        else:
            result = png_case(work, args.src, args.rows, args.decode_threads)
            what = f"gather-cc, {args.rows} rows of an 81 MP PNG of {result.pop('png_bytes') / 1000:.0f} kB"
    cost = f"exit {result['exit']}, {result['seconds']:.1f} s, max RSS {result['max_rss_mb']:.0f} MB"
    print(f"{what} ({args.src}): {cost}")
    for line in result["tail"]:
        print("   ", line[:200])


if __name__ == "__main__":
    main()
