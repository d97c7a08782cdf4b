"""Screenshots and a printed PDF of a run's report.html, taken by a real headless browser (Chromium).

    python benchmarks/report_screens.py RUN_DIR [--out DIR] [--rebuild]

Writes into DIR (default RUN_DIR/screens): report-1280.png and report-390.png (the whole page, laid out
at that width: a desktop window and a phone), report.pdf (the page as printed, A4), and prints what the
browser measured at each width: the page's scroll width against the viewport's (wider means the whole
page scrolls sideways), elements sticking out of the viewport outside any scroll box of their own, the
narrowest text cell, and the smallest text in each plot as displayed (its size in the PNG, from the
image's data-text-px, times the image's scale on screen).

Chromium is driven over `--remote-debugging-pipe` (the DevTools protocol on file descriptors 3 and 4,
as Puppeteer does): `--window-size` cannot make a phone, headless Chromium widens any window narrower
than 500 px, while `Emulation.setDeviceMetricsOverride` lays the page out at exactly 390 px as a mobile
viewport (the page's <meta name=viewport> applies). The report is not changed: the measuring is one
`Runtime.evaluate` on the loaded page. `measure(html_path, width)` is what
tests/reports/test_report_layout.py checks.

Needs Chromium (Debian: `apt-get install chromium`); `--chromium PATH` to use another binary.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 390)
PHONE = 500  # below this width the page is laid out as on a phone (mobile viewport)
MAX_HEIGHT = 30_000  # px: a full-page screenshot taller than this is cut (a report is ~5,000-15,000)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
# What the page looks like to the browser, as JSON: evaluated once the page has loaded.
MEASURE = """(() => {
  const root = document.documentElement, width = root.clientWidth;
  const out = {clientWidth: width, scrollWidth: root.scrollWidth, scrollHeight: root.scrollHeight,
               sticking_out: [], text_cells: [], images: []};
  const scrolls = (el) => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement)
      if (["auto", "scroll", "hidden"].includes(getComputedStyle(p).overflowX)) return true;
    return false;
  };
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.width && box.right > width + 0.5 && !scrolls(el))
      out.sticking_out.push(el.tagName.toLowerCase() + (el.className ? "." + el.className : "")
                            + " right=" + Math.round(box.right));
  }
  for (const el of document.querySelectorAll("td.text"))
    out.text_cells.push(Math.round(el.getBoundingClientRect().width));
  for (const el of document.querySelectorAll("img")) {
    const shown = el.getBoundingClientRect().width;
    const px = parseFloat(el.getAttribute("data-text-px") || "0");
    out.images.push({alt: el.alt, shown: Math.round(shown), natural: el.naturalWidth,
                     smallest_text_px: Math.round(px * shown / el.naturalWidth * 10) / 10});
  }
  return JSON.stringify(out);
})()"""


class Browser:
    """Headless Chromium with a throw-away profile, one page, driven over the DevTools pipe."""

    def __init__(self, binary: str = CHROMIUM, timeout: float = 60) -> None:
        self.timeout, self.next_id, self.buffer, self.loaded = timeout, 0, b"", False
        self.profile = tempfile.TemporaryDirectory(prefix="report-screens-")
        self.reader: int | None = None
        to_chrome, from_chrome = os.pipe(), os.pipe()
        # Chromium's ends, moved above 9 (non-inheritable) so that placing them at 3 and 4 in the child
        # cannot overwrite one with the other; dup2 makes the copies at 3 and 4 inheritable.
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome[0], from_chrome[1])]
        os.close(to_chrome[0])
        os.close(from_chrome[1])

        def pipes_at_3_and_4() -> None:  # where --remote-debugging-pipe reads and writes
            os.dup2(theirs[0], 3)
            os.dup2(theirs[1], 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # (would close 3 and 4 after preexec_fn); Python's own fds are not inherited
            preexec_fn=pipes_at_3_and_4,
        )
        os.close(theirs[0])
        os.close(theirs[1])
        self.writer, self.reader = to_chrome[1], from_chrome[0]
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)

    def send(self, method: str, *, session: bool = False, **params: Any) -> dict:
        """One command; its result. Events arriving meanwhile are read past (receive notes the load)."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError("chromium stopped answering on the DevTools pipe")
            if not select.select([self.reader], [], [], min(left, 1.0))[0]:
                continue
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message = json.loads(raw)
        if message.get("method") == "Page.loadEventFired":
            self.loaded = True
        return message

    def open(self, html_path: Path, width: int, height: int = 900) -> None:
        """Load the page laid out `width` px wide (as a phone below PHONE px) and wait for its load."""
        self.viewport(width, height)
        self.loaded = False
        self.send("Page.navigate", session=True, url=html_path.resolve().as_uri())
        while not self.loaded:
            self.receive()

    def viewport(self, width: int, height: int) -> None:
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < PHONE}
        self.send("Emulation.setDeviceMetricsOverride", session=True, **metrics)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, out: Path, width: int, height: int) -> Path:
        """The whole page (up to MAX_HEIGHT px) as a PNG."""
        self.viewport(width, min(height, MAX_HEIGHT))
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        return out

    def pdf(self, out: Path) -> Path:
        """The page as printed on A4 (print CSS applies), without the browser's header and footer."""
        self.viewport(1280, 900)
        data = self.send(
            "Page.printToPDF", session=True, paperWidth=8.27, paperHeight=11.69, printBackground=True
        )["data"]
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        for fd in (self.writer, self.reader):
            if fd is not None:
                os.close(fd)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure(html_path: str | Path, width: int, *, binary: str = CHROMIUM) -> dict:
    """What the browser lays out for the page at `width` px (see the module docstring)."""
    with Browser(binary) as browser:
        browser.open(Path(html_path), width)
        return json.loads(browser.evaluate(MEASURE))


def describe(width: int, m: dict) -> str:
    overflow = m["scrollWidth"] - m["clientWidth"]
    lines = [
        f"{width} px: page {m['scrollWidth']} px wide in a {m['clientWidth']} px viewport "
        + ("(no sideways scroll)" if overflow <= 0 else f"(SCROLLS SIDEWAYS by {overflow} px)")
        + f", {m['scrollHeight']} px tall",
        f"  narrowest text cell: {min(m['text_cells'], default='none')} px",
    ]
    lines += [f"  sticking out: {item}" for item in m["sticking_out"][:10]]
    for image in m["images"]:
        lines.append(
            f"  image {image['alt'][:60]!r}: {image['shown']} of {image['natural']} px, "
            f"smallest text {image['smallest_text_px']} px"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder holding report.html")
    parser.add_argument("--out", type=Path, help="where to write the files (default RUN/screens)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild report.html first (llmclf report)")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser binary (default {CHROMIUM})")
    args = parser.parse_args(argv)
    if not (Path(args.chromium).is_file() or shutil.which(args.chromium)):
        print(f"{args.chromium} not found: install Chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    if args.rebuild:
        from llmclf.reports.run_report import build_report

        build_report(args.run)
    page = (args.run / "report.html").resolve()
    if not page.is_file():
        print(f"{page} not found: run `llmclf report {args.run}` first (or pass --rebuild)", file=sys.stderr)
        return 2
    out = (args.out or args.run / "screens").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with Browser(args.chromium) as browser:
        for width in WIDTHS:
            browser.open(page, width)
            m = json.loads(browser.evaluate(MEASURE))
            print(describe(width, m))
            print(f"  -> {browser.screenshot(out / f'report-{width}.png', width, m['scrollHeight'])}")
        browser.open(page, 1280)
        print(f"printed -> {browser.pdf(out / 'report.pdf')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
