"""Benchmark the CUDA paths in one short run (torch, torchvision, pyarrow, fsspec and Pillow only: no Ray).

1. FCN-8s VGG16 (aligned geometry) at 500x500 through ``fcn.Predictor`` with statistics, as the FCN
   actor calls it: fp32 against bf16 autocast + channels_last, images/s per batch size, and the bf16
   masks' agreement with fp32 (score layers fitted to a synthetic scene, so masks are not trivial);
2. JPEG decoding: nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``, batched) against Pillow
   on one CPU core, images/s and the pixel difference between the two;
3. the FCN actor itself (``pipelines.segment.stages.Segmenter``) on blocks that ``load_images`` left as
   JPEG bytes: images/s of the actor's thread (decode on the GPU, network, statistics, labels back to
   the host), and the CPU cost per image of the stages beside it (``load_images`` header checks,
   ``store_results`` mask encoding), which size the CPUs a GPU node needs.
Prints a markdown table and writes it, with the raw numbers, to ``--out`` (JSON).

    python -m bench.gpu_paths --out $OUT/gpu_paths.json              # on a CUDA machine, ~2-3 min
    python -m bench.gpu_paths --device cpu --size 128 --images 16    # a smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bench.model_throughput import fit_score_layers
from fcn import Predictor, get_model
from fcn.conventions import get_convention
from pipelines.synthetic import SYNTHETIC_CLASSES, render_scene


def scene_jpegs(count: int, size: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """``count`` JPEGs of different synthetic scenes, plus the first scene's pixels and labels."""
    images, first = [], None
    for seed in range(count):
        small = max(16, size // 4)  # drawn small and enlarged: objects cover a realistic share of the frame
        image, label = render_scene(np.random.default_rng(seed), small, small, 6)
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        if first is None:
            first = (image, np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST)))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images, first[0], first[1]


def rate(fn, device: torch.device, count: int, repeats: int) -> float:
    """Items per second of ``fn`` (which handles ``count`` items), fastest of ``repeats`` after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG scenes")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=60)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "size": args.size}
    rows: list[tuple[str, str, str]] = []

    jpegs, image, label = scene_jpegs(args.images, args.size)
    pixels = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs]
    model = get_model("fcn8s_vgg16", num_classes=len(SYNTHETIC_CLASSES), geometry="aligned").to(device).eval()
    x = get_convention("torchvision").to_tensor(image, device)[None]
    target = torch.from_numpy(label.astype(np.int64))[None].to(device)
    results["fitted_pixel_accuracy"] = fit_score_layers(model, x, target, args.fit_steps)

    # 1. the network: fp32 against bf16 autocast + channels_last
    fp32 = Predictor(model, device=device)
    bf16 = Predictor(get_model("fcn8s_vgg16", num_classes=len(SYNTHETIC_CLASSES), geometry="aligned"), device=device,
                     bf16=True, channels_last=True)
    bf16.model.load_state_dict(fp32.model.state_dict())
    reference = fp32.predict_batch(pixels, statistics=True)
    agreement = float(np.mean([(a.labels == b.labels).mean() for a, b in zip(reference, bf16.predict_batch(pixels, statistics=True))]))
    results["bf16_mask_agreement"] = agreement
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        chunk = (pixels * (1 + batch // len(pixels)))[:batch]
        for name, predictor in (("fp32", fp32), ("bf16 + channels_last", bf16)):
            images_per_s = rate(lambda p=predictor: p.predict_batch(chunk, statistics=True), device, batch, args.repeats)
            results[f"network {name} batch {batch} images/s"] = images_per_s
            rows.append((f"FCN-8s {args.size}px {name}, batch {batch}", f"{images_per_s:.1f} images/s", ""))
    rows.append(("bf16 + channels_last masks = fp32 masks", f"{100 * agreement:.2f}% of pixels", f"{args.images} scenes"))

    # 2. JPEG decoding: nvJPEG batched against Pillow
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    if device.type == "cuda":
        gpu_rate = rate(lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), device, len(jpegs), args.repeats)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        diff = np.concatenate([np.abs(d.permute(1, 2, 0).cpu().numpy().astype(int) - p).ravel() for d, p in zip(decoded, pixels)])
        results.update({"nvjpeg images/s": gpu_rate, "nvjpeg vs pillow mean abs diff": float(diff.mean()), "max abs diff": int(diff.max())})
        rows.append(("nvJPEG decode, batched", f"{gpu_rate:.0f} images/s", f"vs Pillow: mean |diff| {diff.mean():.2f}, max {diff.max()}"))
    cpu_rate = rate(lambda: [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs], torch.device("cpu"), len(jpegs), args.repeats)
    results["pillow images/s (1 core)"] = cpu_rate
    rows.append(("Pillow decode, 1 CPU core", f"{cpu_rate:.0f} images/s", ""))

    # 3. the FCN actor on blocks of JPEG bytes, and the CPU stages beside it
    import fsspec
    import pyarrow as pa

    from fcn.checkpoint import save_checkpoint
    from pipelines import stats as stats_table
    from pipelines.listing import list_images
    from pipelines.segment.model import describe_model
    from pipelines.segment.stages import Segmenter, load_images, store_results

    root = tempfile.mkdtemp(prefix="gpu-paths-")
    fs = fsspec.filesystem("file")
    fs.makedirs(f"{root}/in", exist_ok=True)
    fs.pipe({f"{root}/in/img{i:04d}.jpg": data for i, data in enumerate(jpegs)})
    save_checkpoint(model.cpu(), f"{root}/model.pt", class_names=list(SYNTHETIC_CLASSES))
    sources = list_images(f"{root}/in", {}).images
    load_cpu_ms = {}
    for device_jpegs in (False, True):  # decode on the CPU / leave JPEGs to the actor (header checks only)
        start = time.process_time()
        loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**9, device_jpegs=device_jpegs)
        load_cpu_ms[device_jpegs] = (time.process_time() - start) * 1000 / sources.num_rows
    actor = Segmenter(model_uri=f"{root}/model.pt", storage_options={}, device=device.type, precision="auto",
                      cpu_threads=1, max_image_pixels=10**9, keep_pixels=False)
    actor_rate = rate(lambda: actor(loaded), device, sources.num_rows, args.repeats)
    segmented = actor(loaded)
    info = describe_model(f"{root}/model.pt", {})
    schema = stats_table.stats_schema(info.class_names, info.palette, {})
    start = time.process_time()
    store_results(segmented, output=f"{root}/out", storage_options={}, run_id="bench", model=info, schema=schema, retries=0)
    store_cpu_ms = (time.process_time() - start) * 1000 / sources.num_rows
    results.update({"actor images/s": actor_rate, "load_images CPU ms/image (decode)": load_cpu_ms[False],
                    "load_images CPU ms/image (JPEGs left to the actor)": load_cpu_ms[True], "store_results CPU ms/image": store_cpu_ms})
    rows.append(("FCN actor thread (JPEG decode, network, statistics, labels to host)", f"{actor_rate:.1f} images/s", f"block of {sources.num_rows}"))
    rows.append(("load_images beside it: read + Pillow decode", f"{load_cpu_ms[False]:.2f} CPU ms/image", "non-JPEG inputs"))
    rows.append(("load_images beside it: read + header checks", f"{load_cpu_ms[True]:.2f} CPU ms/image", "JPEGs decoded by the actor"))
    rows.append(("store_results beside it (PNG masks, Parquet)", f"{store_cpu_ms:.2f} CPU ms/image", ""))

    print(f"device: {results['device']}; FCN-8s VGG16 aligned, {args.size}x{args.size}; "
          f"fitted pixel accuracy {results['fitted_pixel_accuracy']:.3f}")
    print("| measure | result | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**results, "table": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
