"""What the web chat page adds to the time to the first streamed character.

    python benchmarks/bench_web_page.py [--runs 20] [--max-tokens 8]

One `glmstack serve` with the bundled model (a subprocess on a free port, a throwaway GLMSTACK_HOME, open on
loopback), then N alternating runs of the same prompt, temperature 0:

  API TTFT   httpx, one kept-alive client: from sending a streamed chat request to the first chunk whose
             delta has non-empty content.
  page TTFT  headless Chromium (Debian's chromium, driven by Playwright) on `/`: from the Send click handler
             to the first streamed character appended to the DOM, both read with performance.now() inside the
             page (window.glmstackTiming, set by glmstack/web/app.js). Each run starts a new chat, so the
             page also creates a conversation and stores the user's message once the reply has started.

Each measured request, on either side, follows a 0.3 s pause, so neither competes with the tail of the run
before it.

Prints both medians, the page's overhead in ms and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

PROMPT = "Name a colour."
CHAT = "/api/paas/v4/chat/completions"
SETTLE_S = 0.3  # a pause before every measured request, on both sides


def serve(home: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMSTACK_")}
    env |= {"GLMSTACK_HOME": str(home), "GLMSTACK_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "glmstack.cli.main", "serve"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=(home / "server.log").open("w"))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if match := re.match(r"glmstack is serving \S+ at (http://\S+)", line):
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{(home / 'server.log').read_text()[-2000:]}")


def api_ttft(client: httpx.Client, url: str, model: str, max_tokens: int) -> float:
    time.sleep(SETTLE_S)
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    start = time.perf_counter()
    first = None
    with client.stream("POST", url + CHAT, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
    assert first is not None, "no content streamed"
    return first


# Where the page's time goes, from the browser's resource timing of the chat request (ms after the click).
SPLIT = """() => {
  const g = window.glmstackTiming;
  const r = performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/chat/completions')).pop();
  return {request: r.requestStart - g.send, headers: r.responseStart - g.send, dom: g.firstChar - g.send};
}"""


def page_ttft(page, splits: list[dict[str, float]]) -> float:
    page.click("#new-chat")
    page.evaluate("performance.clearResourceTimings()")
    time.sleep(SETTLE_S)  # the previous turn's bookkeeping (list refresh) is over, as for the API run
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_function("() => window.glmstackTiming.firstChar !== null", timeout=120_000)
    page.wait_for_selector("article.assistant:last-of-type .regenerate", timeout=120_000)  # ended and stored
    splits.append(page.evaluate(SPLIT))
    timing = page.evaluate("window.glmstackTiming")
    return (timing["firstChar"] - timing["send"]) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium on PATH (Debian: apt-get install chromium)")

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve(Path(tmp))
        try:
            with httpx.Client(timeout=120) as client, sync_playwright() as p:
                model = client.get(url + "/api/paas/v4/models").json()["data"][0]["id"]  # the page's default
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                settings = {"model": model, "temperature": 0, "max_tokens": args.max_tokens}
                remembered = json.dumps(json.dumps(settings))
                context.add_init_script(f"localStorage.setItem('glmstack.settings', {remembered})")
                page = context.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#send:not([disabled])")
                api_ttft(client, url, model, args.max_tokens)  # warm-up, both paths
                page_ttft(page, [])
                api, web, splits = [], [], []
                for i in range(args.runs):  # alternating, so drift on a shared machine hits both alike
                    if i % 2 == 0:
                        api.append(api_ttft(client, url, model, args.max_tokens))
                        web.append(page_ttft(page, splits))
                    else:
                        web.append(page_ttft(page, splits))
                        api.append(api_ttft(client, url, model, args.max_tokens))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    api_ms, web_ms = statistics.median(api) * 1000, statistics.median(web) * 1000
    print(f"model {model}, prompt {PROMPT!r}, temperature 0, max_tokens {args.max_tokens}, {args.runs} runs each")
    print(f"API TTFT  (httpx)              median {api_ms:7.1f} ms   min {min(api) * 1000:7.1f}   "
          f"max {max(api) * 1000:7.1f}")
    print(f"page TTFT (Chromium, click->DOM) median {web_ms:7.1f} ms   min {min(web) * 1000:7.1f}   "
          f"max {max(web) * 1000:7.1f}")
    for name, what in (("request", "request sent"), ("headers", "response headers"), ("dom", "first char in DOM")):
        print(f"  page, click -> {what:18s} median {statistics.median(s[name] for s in splits):7.1f} ms")
    print(f"page overhead: {web_ms - api_ms:+.1f} ms ({web_ms / api_ms:.2f}x the API's TTFT)")


if __name__ == "__main__":
    main()
