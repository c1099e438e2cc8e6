"""Screenshots of every tab of the app after a small compression, taken with headless Chromium.

    python -m bench.screenshots [--model smollm2-135m] [--method layerdrop --ratio 0.25] [--out assets]

Without --method/--ratio it compresses as a new user would: the app's default method and ratio.

Launches the app in-process on a free local port (or uses --url), compresses with the form's defaults
(calibration included), opens each tab, evaluates, chats, compares on the example prompts, and writes
assets/tab_<name>.png. Needs Debian's ``chromium`` and the ``playwright`` package
(its bundled driver only: no browser download).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

def method_label(name: str) -> str:
    from compression.methods import METHODS

    return METHODS[name].label


def method_note_start(name: str) -> str:
    from compression.methods import METHODS

    return METHODS[name].summary.split("**")[0][:24]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_quiet(page, locator, timeout_s: float = 300, quiet_s: float = 1.5) -> str:
    """Wait until ``locator``'s text stops changing (a streamed reply has finished)."""
    last, since, end = None, time.time(), time.time() + timeout_s
    while time.time() < end:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.time()
        elif time.time() - since > quiet_s:
            return text
        page.wait_for_timeout(250)
    return last


def shoot(url: str, out: Path, method: str, ratio: float, prompt: str, timeout_s: float,
          saved: str | None = None, saved_layer: int = 10) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                    headless=True, args=CHROMIUM_ARGS)
        phone(browser, url, out / "phone.png", int(timeout_s * 1000))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            _flow(page, url, out, method, ratio, prompt, timeout_s, saved, saved_layer)
        except Exception:
            page.screenshot(path=str(out / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _flow(page, url, out, method, ratio, prompt, timeout_s, saved=None, saved_layer=10):
    ms = int(timeout_s * 1000)
    page.goto(url)
    page.get_by_text("Training-free compression").first.wait_for(timeout=ms)
    if method != "none":
        _compress_evaluate_chat(page, out, method, ratio, prompt, ms, timeout_s)
    if saved:  # Inspect a saved run (a method with spectra) without compressing again
        page.get_by_role("tab", name="Runs").click()
        page.get_by_label("…or a saved run's folder name", exact=False).fill(saved)
        page.get_by_role("button", name="Load run").click()
        page.get_by_text("Loaded").first.wait_for(timeout=ms)
        page.get_by_role("tab", name="Inspect").click()
        page.get_by_text("r2 · ").first.wait_for(timeout=ms) if method != "none" else \
            page.get_by_text("r1 · ").first.wait_for(timeout=ms)
        layer_box = page.get_by_label("number input for Layer", exact=True)
        layer_box.fill(str(saved_layer))
        layer_box.press("Tab")  # the slider's box reports on blur
        page.get_by_text(f"Layer {saved_layer}: eigenvalue spectra").first.wait_for(timeout=ms)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out / "tab_inspect_saved.png"), full_page=True)
        chat(page, out / "tab_chat_saved.png", prompt, ms, timeout_s)
        runs(page, out / "tab_runs.png")


def runs(page, path: Path) -> None:
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(path), full_page=True)


def chat(page, path: Path, prompt: str, ms: int, timeout_s: float) -> None:
    """The dense model and the selected run answer ``prompt`` side by side."""
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="Clear chat").click()
    page.wait_for_function("() => /\\br\\d+ · /.test(document.querySelector('.chat-panes').innerText)",
                           timeout=ms)  # the run's pane, named
    box = page.get_by_placeholder("Message every model…")
    box.fill(prompt)
    box.press("Enter")
    bots = page.locator('[data-testid="bot"]').filter(has_text="tok/s")
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=\"bot\"]')].filter(e => e.innerText.includes('tok/s')).length >= 2",
        timeout=ms)
    wait_quiet(page, page.locator(".chat-panes"), timeout_s, quiet_s=6)  # a busy CPU pauses a stream
    page.evaluate("document.querySelectorAll('.chat-panes .bubble-wrap').forEach(w => w.scrollTop = 0)")
    page.wait_for_timeout(500)  # the prompt in view, above the reply
    print("chat:", [t[:80] for t in bots.all_inner_texts()])
    page.screenshot(path=str(path), full_page=True)


def compare(page, path: Path, ms: int, timeout_s: float) -> None:
    """The example prompts through the dense model and the run, in one table."""
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="Compare on these prompts").click()
    page.wait_for_function("() => document.body.innerText.includes('Compare 100%')", timeout=ms)
    wait_quiet(page, page.locator(".compare-table"), timeout_s, quiet_s=6)
    page.locator(".compare-table").scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # no row highlighted under the pointer
    print("compare:", page.locator(".compare-table").inner_text()[:300].replace("\n", " | "))
    page.screenshot(path=str(path), full_page=True)


def forecast(page, path: Path, ms: int) -> None:
    """The error forecast after Measure: per-layer predicted errors and the trade-off curve."""
    page.get_by_role("button", name="Measure", exact=True).click()
    page.get_by_text("Forecast total error").first.wait_for(timeout=ms)
    page.wait_for_timeout(1500)
    page.get_by_text("Error forecast (before compressing)").first.scroll_into_view_if_needed()
    page.screenshot(path=str(path), full_page=True)


def phone(browser, url: str, path: Path, ms: int) -> None:
    """The page at phone width (390 × 844): the tab bar wraps, the form in one column."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(url)
        page.get_by_text("Training-free compression").first.wait_for(timeout=ms)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(path))
    finally:
        page.close()


def _compress_evaluate_chat(page, out, method, ratio, prompt, ms, timeout_s):
    page.get_by_label(method_label(method)).check()
    page.get_by_text(method_note_start(method)).first.wait_for(timeout=ms)  # the form follows
    ratio_box = page.get_by_label("number input for Target ratio")
    ratio_box.fill(str(ratio))
    ratio_box.press("Enter")
    page.wait_for_timeout(2000)  # the live forecast
    forecast(page, out / "tab_compress_forecast.png", ms)
    page.get_by_role("button", name="Compress", exact=True).click()
    page.locator(".job-progress").first.wait_for(timeout=30_000)  # painted within seconds, first run too
    page.wait_for_timeout(8000)
    page.screenshot(path=str(out / "tab_compress_progress.png"), full_page=True)
    done = page.get_by_text(re.compile(r"✔ r\d+")).first  # the run's status line, not the forecast's "✔"
    done.wait_for(timeout=ms)
    page.screenshot(path=str(out / "tab_compress.png"), full_page=True)
    print("compress:", done.inner_text())

    page.get_by_role("tab", name="Inspect").click()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6", timeout=ms)
    page.get_by_text("Block Influence per layer").first.wait_for(timeout=ms)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "tab_inspect.png"), full_page=True)

    page.get_by_role("tab", name="Evaluate").click()
    page.get_by_role("button", name="Evaluate dense vs compressed").click()
    page.get_by_text("decode tokens/s").first.wait_for(timeout=ms)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "tab_evaluate.png"), full_page=True)

    chat(page, out / "tab_chat.png", prompt, ms, timeout_s)
    compare(page, out / "tab_chat_compare.png", ms, timeout_s)

    runs(page, out / "tab_runs.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running app (default: launch one in-process)")
    ap.add_argument("--model", default=None, help="default model of the launched app")
    from compression.methods import METHODS
    from ui.compress_tab import DEFAULT_METHOD, DEFAULT_RATIO

    ap.add_argument("--method", default=DEFAULT_METHOD, choices=[*METHODS, "none"],
                    help="none: only --saved (default: the app's)")
    ap.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="default: the app's")
    ap.add_argument("--prompt", default="Write a haiku about autumn.")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    ap.add_argument("--saved", default=None,
                    help="also load this saved run (folder with report.json) and screenshot its Inspect tab")
    ap.add_argument("--saved-layer", type=int, default=10, help="layer shown for --saved")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for each step")
    args = ap.parse_args()
    demo = None
    url = args.url
    if url is None:
        import app
        from compression.models import DEFAULT_MODEL

        demo = app.build_app(args.model or DEFAULT_MODEL)
        demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **app.launch_options())
        url = demo.local_url
    try:
        shoot(url, args.out, args.method, args.ratio, args.prompt, args.timeout, args.saved, args.saved_layer)
    except Exception:
        print("failed; the page at that moment is in", args.out / "failure.png", file=sys.stderr)
        raise
    finally:
        if demo is not None:
            demo.close()
    print("wrote", *sorted(str(p) for p in args.out.glob("tab_*.png")))


if __name__ == "__main__":
    main()
