"""First draw, a click's and a box's round trip of the WebGL scatter (dashboard.webgl, branchlens' own
component) in headless Chromium, beside the Vega (SVG) projection chart the app draws below its point
limit, in one run.

A small Streamlit page draws n synthetic points (a few hundred branches in clusters) either as the app's
WebGL panel or as its Vega panel; the clock runs from navigation until dots are on screen (the canvas or
SVG has drawn pixels). For WebGL, from a click on a dot until the app has rerun and printed the clicked
token's branch, and from a shift-drag box until it has printed how many tokens the box holds. Only the
drawing path is measured: at 10^6 tokens the analysis (UMAP) is another matter (bench/view_scale.py).

    python bench/webgl_scatter.py [--sizes 20000,100000,1000000] [--vega-max 20000]

Chromium renders WebGL with SwiftShader (software) here; a GPU draws faster. Needs chromium, chromedriver.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PAGE = """
import sys, time
import numpy as np, polars as pl, streamlit as st
sys.path.insert(0, {root!r})
from dashboard import charts, webgl
n, kind = int(st.query_params["n"]), st.query_params["kind"]
rng = np.random.default_rng(0)
branches = max(n // 400, 1)
centre = rng.normal(size=(branches, 2)) * 6
b = rng.integers(0, branches, n)
xy = centre[b] + rng.normal(size=(n, 2))
colours = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"]
points = pl.DataFrame({{"raw_x": xy[:, 0], "raw_y": xy[:, 1], "branch_id": b, "position": rng.integers(1, 400, n),
                       "prompt_id": b % 5, "token_text": ["tok"] * n}}).with_columns(
    pl.col("prompt_id").replace_strict(dict(enumerate(colours)), return_dtype=pl.String).alias("prompt_color"))
points = points.with_columns(pl.col("prompt_color").alias("shade"), pl.lit("p").alias("prompt_label"),
                             pl.lit(0.8).alias("alpha"), pl.lit("").alias("context"))
t0 = time.perf_counter()
if kind == "webgl":
    state = webgl.state("gl")
    click, box = state.get("click") or {{}}, state.get("selection") or {{}}
    held = int(webgl.inside(webgl.quantize(points, "raw"), box["polygon"]).sum()) if box else 0
    blob, _ = webgl.payload(points, "raw", "branch", view="bench")
    webgl.scatter(blob, "gl")
    st.caption(f"picked branch {{click.get('branch', '-')}} {{click.get('nonce', '')}}")
    st.caption(f"boxed {{held}}")
    st.caption(f"sent {{len(blob) / 1e6:.1f}} MB")
else:
    st.altair_chart(charts.projection(points, None, None, "raw", "raw"), width="stretch", key="vega")
st.caption(f"server {{time.perf_counter() - t0:.2f}} s")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drawn_pixels(element) -> np.ndarray:
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"), dtype=int)
    background = np.median(rgb.reshape(-1, 3), axis=0)
    ys, xs = np.nonzero(np.abs(rgb - background).sum(axis=2) > 120)
    return np.column_stack([xs, ys])


def captions(d) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stCaptionContainer"]')]


def measure(driver, url: str, n: int, kind: str) -> dict:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, 600, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    )

    def idle(d) -> bool:
        return not d.find_elements(By.CSS_SELECTOR, '[data-testid="stSpinner"], [data-stale="true"]')

    def element(d):
        if kind == "vega":
            els = [e for e in d.find_elements(By.CSS_SELECTOR, ".vega-embed svg.marks, .vega-embed canvas")]
            return next((e for e in els if e.is_displayed() and e.size["width"] > 300), None)
        hosts = d.execute_script(
            "return [...document.querySelectorAll('*')].filter(e => e.shadowRoot && "
            "e.shadowRoot.querySelector('.bl-stage'))"
        )
        return hosts[0].shadow_root.find_element(By.CSS_SELECTOR, ".bl-overlay") if hosts else None

    def ready(d):
        e = element(d)
        if e is None or not idle(d):
            return None
        target = e if kind == "vega" else d.execute_script("return arguments[0].previousElementSibling", e)
        try:
            return e if len(drawn_pixels(target)) > 200 else None
        except TimeoutException:  # the renderer too busy to take a screenshot
            return None

    t0 = time.perf_counter()
    driver.get(f"{url}/?n={n}&kind={kind}")
    overlay = wait.until(ready)
    out = {"n": n, "kind": kind, "first draw s": time.perf_counter() - t0}
    server = [t for t in captions(driver) if t.startswith("server")]
    out["server s"] = float(server[0].split()[1]) if server else float("nan")
    sent = [t for t in captions(driver) if t.startswith("sent")]
    out["sent MB"] = float(sent[0].split()[1]) if sent else float("nan")
    if kind != "webgl":
        return out
    canvas = driver.execute_script("return arguments[0].previousElementSibling", overlay)
    dots = drawn_pixels(canvas)
    on = {tuple(p) for p in dots.tolist()}
    inner = [p for p in dots.tolist() if all((p[0] + a, p[1] + b) in on for a in (-1, 1) for b in (-1, 1))]
    x, y = inner[len(inner) // 2]
    w, h = overlay.size["width"], overlay.size["height"]
    t1 = time.perf_counter()
    ActionChains(driver).move_to_element_with_offset(
        overlay, int(x - w / 2), int(y - h / 2)
    ).click().perform()
    wait.until(lambda d: idle(d) and any(t.startswith("picked branch") and "-" not in t for t in captions(d)))
    out["click round trip s"] = time.perf_counter() - t1
    overlay = element(driver)
    t2 = time.perf_counter()
    chain = ActionChains(driver).key_down(Keys.SHIFT).move_to_element_with_offset(overlay, -w // 3, -h // 3)
    chain.click_and_hold().move_by_offset(w // 2, h // 2).release().key_up(Keys.SHIFT).perform()
    wait.until(lambda d: idle(d) and any(t.startswith("boxed") and t != "boxed 0" for t in captions(d)))
    out["box round trip s"] = time.perf_counter() - t2
    out["boxed"] = next(int(t.split()[1]) for t in captions(driver) if t.startswith("boxed"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000,1000000")
    parser.add_argument("--vega-max", type=int, default=20000, help="largest n also drawn with Vega")
    args = parser.parse_args()
    from test_browser import chromium

    folder = Path(tempfile.mkdtemp(prefix="bl-webgl-"))
    (folder / "page.py").write_text(PAGE.format(root=str(ROOT)))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(folder / "page.py"),
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--server.maxMessageSize",
            "400",
        ],
        cwd=folder,
        stdout=open(folder / "st.log", "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=30)
            break
        except OSError:
            time.sleep(0.3)
    driver = chromium()
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            for kind in ("webgl", "vega") if n <= args.vega_max else ("webgl",):
                rows.append(measure(driver, url, n, kind))
                print(rows[-1], flush=True)
    finally:
        driver.quit()
        proc.terminate()
    load = os.getloadavg()[0]
    print(
        "\n| points | chart | first draw | of which server | sent | click round trip | box round trip (tokens) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        click = f"{r['click round trip s']:.1f} s" if "click round trip s" in r else "-"
        box = f"{r['box round trip s']:.1f} s ({r['boxed']:,})" if "boxed" in r else "-"
        sent = f"{r['sent MB']:.1f} MB" if r["kind"] == "webgl" else "-"
        print(
            f"| {r['n']:,} | {r['kind']} | {r['first draw s']:.1f} s | {r['server s']:.2f} s | "
            f"{sent} | {click} | {box} |"
        )
    base = next((r for r in rows if r["kind"] == "vega"), None)
    if base:
        same = next(r for r in rows if r["kind"] == "webgl" and r["n"] == base["n"])
        print(
            f"\nWebGL / Vega first draw at {base['n']:,} points: {same['first draw s'] / base['first draw s']:.2f}"
        )
    print(f"load average {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
