"""The HTML report (pipeline/tools/report.py) on real runs, opened in headless Chromium.

Chromium (Debian's ``chromium`` package) is started by the test with a fresh profile and driven
over the DevTools protocol (websocket-client): the page must load from disk with no console
errors, no failed requests and no exceptions; plots, gallery cards, thumbnails and playable audio
must be present; the in-page filters must work. A full-page screenshot is saved under
``tests/artifacts/``.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.config import ReportConfig
from pipeline.tools.report import load_run, opus_data_uri, write_report

ARTIFACTS = Path(__file__).parent / "artifacts"
PLOT_IDS = (
    "durations", "caption-lengths", "words-captions", "words-transcripts", "languages", "speech-ratio", "audio-tags",
    "visual-tags", "scores", "signals", "drop-reasons", "errors", "duplicates",
)  # fmt: skip


# --------------------------------------------------------------------------- headless Chromium


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        import websocket

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium)")
        self.proc = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                "--remote-allow-origins=*", "--window-size=1400,1000", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and failed loads seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {})}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        stderr = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else ""
        self.stderr = stderr


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def _open(browser: Browser, page: Path) -> None:
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable")
    browser.call("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")


def _console_errors_in_stderr(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]


# --------------------------------------------------------------------------- tests


def test_report_is_written_at_the_end_of_a_run(plain_run: Path) -> None:
    page = plain_run / "report" / "index.html"
    text = page.read_text()
    assert "avforge caption-quality report" in text
    # self-contained: nothing is fetched at view time
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert text.count('class="card"') == pq.read_metadata(plain_run / "index.parquet").num_rows  # all fit the sample


def test_enriched_report_in_headless_chromium(enriched_run: Path, browser: Browser) -> None:
    page = write_report(enriched_run, ReportConfig(gallery_size=4, lowest=2, rejected=5))
    _open(browser, page)
    # wait until every audio element has parsed its (data URI) stream
    ready = browser.eval(
        """new Promise(done => {
             const t0 = Date.now();
             const check = () => {
               const a = [...document.querySelectorAll('audio')];
               if (a.every(x => x.readyState >= 1 || x.error)) done(a.map(x => [x.readyState, x.duration, !!x.error]));
               else if (Date.now() - t0 > 15000) done(a.map(x => [x.readyState, x.duration, !!x.error]));
               else setTimeout(check, 100);
             };
             check();
           })"""
    )
    facts = browser.eval(
        """({
          plots: [...document.querySelectorAll('#plots figure')].map(f => [f.id.replace('plot-', ''), !!f.querySelector('svg.plot rect')]),
          cards: document.querySelectorAll('.card').length,
          kept: document.querySelectorAll('.card[data-status="kept"]').length,
          rejectedReasons: [...document.querySelectorAll('.card:not([data-status="kept"])')].map(c => c.dataset.status),
          thumbs: [...document.querySelectorAll('.thumbs img')].map(i => i.complete && i.naturalWidth > 0),
          cardsWithMedia: [...document.querySelectorAll('.card')].filter(c => c.querySelector('.thumbs img') && c.querySelector('audio')).length,
          captionTables: document.querySelectorAll('table.captions tr').length,
          errorRows: document.querySelectorAll('#errors tr').length,
          shown: document.getElementById('shown').textContent,
        })"""
    )
    stats = load_run(enriched_run)
    plots = dict(facts["plots"])
    assert set(PLOT_IDS) <= set(plots)
    assert all(plots[p] for p in PLOT_IDS), plots  # every plot has data drawn in this run
    assert facts["cards"] >= 4 + 1 and facts["kept"] >= 4
    assert set(facts["rejectedReasons"]) == set(stats.rejected.column("drop_reason").to_pylist())
    assert facts["thumbs"] and all(facts["thumbs"])
    assert facts["cardsWithMedia"] == facts["cards"]  # rejected clips too: the run kept its staging area
    assert ready and all(state >= 1 and not err and duration > 1.0 for state, duration, err in ready), ready
    assert facts["captionTables"] >= 4 * 4  # header + 3 captions per kept card
    assert facts["errorRows"] == 1 + stats.errors.num_rows
    # filters: by reason, by tag, back to all
    filtered = browser.eval(
        """(() => {
          const visible = () => [...document.querySelectorAll('.card')].filter(c => !c.classList.contains('hidden'));
          const s = document.getElementById('f-status'), t = document.getElementById('f-tag');
          s.value = 'duplicate'; s.dispatchEvent(new Event('change'));
          const dup = visible().map(c => c.dataset.status);
          s.value = ''; s.dispatchEvent(new Event('change'));
          t.value = 'speech'; t.dispatchEvent(new Event('input'));
          const speech = visible().map(c => c.dataset.tags);
          t.value = ''; t.dispatchEvent(new Event('input'));
          return {dup, speech, all: visible().length};
        })()"""
    )
    assert filtered["dup"] == ["duplicate"]
    assert all("speech" in tags for tags in filtered["speech"])
    assert filtered["all"] == facts["cards"]
    # screenshot of the whole page, kept as a test artifact
    height = browser.eval("document.documentElement.scrollHeight")
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": 1400, "height": min(int(height), 12000), "scale": 1})  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert browser.problems() == []
    browser.close()
    assert _console_errors_in_stderr(browser.stderr) == []


def test_plain_report_renders_without_errors(plain_run: Path, browser: Browser) -> None:
    """A run with only the default stages: empty signals show as 'no data', nothing breaks."""
    _open(browser, plain_run / "report" / "index.html")
    facts = browser.eval(
        """({
          empty: [...document.querySelectorAll('#plots figure')].filter(f => f.querySelector('.empty')).map(f => f.id),
          drawn: [...document.querySelectorAll('#plots figure svg.plot')].length,
          cards: document.querySelectorAll('.card').length,
          audio: document.querySelectorAll('.card audio').length,
        })"""
    )
    assert "plot-audio-tags" in facts["empty"] and "plot-scores" in facts["empty"]
    assert facts["drawn"] >= 2 and facts["cards"] >= 1 and facts["audio"] == facts["cards"]
    assert browser.problems() == []


def test_report_tolerates_a_partial_folder(tmp_path: Path, enriched_run: Path) -> None:
    """No stats/rejects/errors yet (e.g. an interrupted run): the report still renders."""
    partial = tmp_path / "partial"
    shutil.copytree(enriched_run / "shards", partial / "shards")
    shutil.copy(enriched_run / "index.parquet", partial / "index.parquet")
    text = write_report(partial).read_text()
    assert 'class="card"' in text and "no errors" in text


def test_opus_audio_is_small_and_decodable(enriched_run: Path) -> None:
    from pipeline.tools.loader import decode_audio
    from pipeline.tools.inspect import iter_samples

    shard = sorted((enriched_run / "shards").glob("*.tar"))[0]
    key, members = next(iter_samples(shard))
    uri = opus_data_uri(members["flac"])
    assert uri.startswith("data:audio/ogg;base64,")
    ogg = base64.b64decode(uri.split(",", 1)[1])
    flac_seconds = len(decode_audio(members["flac"], 16000)) / 16000
    assert len(ogg) < len(members["flac"]) / 3
    assert abs(len(decode_audio(ogg, 16000)) / 16000 - flac_seconds) < 0.1
