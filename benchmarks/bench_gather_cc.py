"""gather-cc throughput (rows/s) against a local image server, by concurrency, server delay and format.

The server (aiohttp, in its own process so it does not share the client's GIL) serves `--rows`
distinct small JPEGs (`--size`, default 400x300) after an optional per-request delay that stands in
for network round trips. Every row succeeds, so the numbers are the client's ceiling on this
machine: fetch + decode + resize + JPEG encode + atomic write + state line. The last line gives the
single-thread cost of the image step alone, to extrapolate to machines with more cores.

    python benchmarks/bench_gather_cc.py                       # the table in docs/gather_cc.md
    python benchmarks/bench_gather_cc.py --rows 200 --concurrency 8 --latency-ms 0 --size 1024x768
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from protorkd.data.gather_cc import gather_cc
from protorkd.data.gather_image import process_image


def _make_images(count: int, size: tuple[int, int]) -> list[bytes]:
    """`count` distinct photo-like JPEGs (gradients plus per-image noise) of `size`."""
    base = Image.linear_gradient("L").resize(size)
    images = []
    for index in range(count):
        noise = Image.effect_noise(size, 10 + index % 20)
        rgb = Image.merge("RGB", (base, noise, base.rotate(index % 360)))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


def _serve(port_queue: multiprocessing.Queue, count: int, size: tuple[int, int]) -> None:
    from aiohttp import web

    images = _make_images(count, size)

    async def image(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=images[int(request.match_info["index"])], content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/img/{index}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _image_step_ms(size: tuple[int, int]) -> tuple[float, float]:
    """(ms per image of process_image on one thread, mean JPEG size in kB) over 50 images."""
    samples = _make_images(50, size)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gather_cc_"))
    try:
        started = time.perf_counter()
        for index, data in enumerate(samples):
            process_image(data, scratch / f"{index}.jpg", scratch / "tmp.jpg", max_side=512, min_side=64)
        return (time.perf_counter() - started) / len(samples) * 1000, sum(map(len, samples)) / len(samples) / 1000
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="images to gather per measurement")
    parser.add_argument("--concurrency", default="16,64,128", help="comma-separated --concurrency values")
    parser.add_argument("--latency-ms", default="0,50", help="comma-separated server delays per request (ms)")
    parser.add_argument("--formats", default="tsv,webdataset", help="comma-separated output formats")
    parser.add_argument("--size", default="400x300", help="served image size WxH (default: 400x300)")
    parser.add_argument("--decode-threads", type=int, default=None, help="decode threads (default: CPU count)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    port_queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(port_queue, args.rows, size), daemon=True)
    server.start()
    port = port_queue.get(timeout=120)
    workdir = Path(tempfile.mkdtemp(prefix="bench_gather_cc_"))
    results = []
    try:
        for latency_ms in [float(v) for v in args.latency_ms.split(",")]:
            tsv = workdir / f"cc_{latency_ms:g}.tsv"
            query = f"?delay={latency_ms / 1000}" if latency_ms else ""
            rows = (f"photo {i}\thttp://127.0.0.1:{port}/img/{i}.jpg{query}\n" for i in range(args.rows))
            tsv.write_text("".join(rows))
            for concurrency in [int(v) for v in args.concurrency.split(",")]:
                for output_format in args.formats.split(","):
                    out = workdir / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    started = time.perf_counter()
                    stats = gather_cc(
                        tsv,
                        out,
                        output_format=output_format,
                        concurrency=concurrency,
                        decode_threads=args.decode_threads,
                        progress=False,
                        allow_private_hosts=True,  # the local server is on 127.0.0.1
                    )
                    seconds = time.perf_counter() - started
                    results.append((output_format, concurrency, latency_ms, stats["ok"], seconds))
    finally:
        server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    image_ms, kilobytes = _image_step_ms(size)

    threads = args.decode_threads or os.cpu_count()
    print(f"gather-cc: {args.rows} rows of {args.size} JPEG (~{kilobytes:.0f} kB), {os.cpu_count()} CPUs shared")
    print(f"with the server process, {threads} decode threads")
    print("| format | concurrency | server delay (ms) | ok | seconds | rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for output_format, concurrency, latency_ms, ok, seconds in results:
        print(f"| {output_format} | {concurrency} | {latency_ms:g} | {ok} | {seconds:.2f} | {ok / seconds:.0f} |")
    print(f"image step alone (decode + resize + encode + write), one thread: {image_ms:.2f} ms/image")


if __name__ == "__main__":
    main()
