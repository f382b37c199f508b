"""JupyterLab as `make lab` starts it, driven by a real headless Chromium.

The lab runs from scripts/lab.sh on a free port with a known token, over a copy of
the exploration notebook pointed at a small dataset ingested here. Playwright drives
Debian's Chromium (Playwright's own browser download does not work offline): it opens
the notebook, runs all cells from the Run menu, waits for the plots, moves the slice
viewer's slider, and saves screenshots under test-artifacts/browser/. The lab is then
stopped with SIGINT, as Ctrl-C would, by its PID.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from fixtures.orthanc import free_port
from ingest_helpers import ingest_folder

from workbench.samples import generate_studies

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "browser"
NOTEBOOK = "01-explore-dataset.ipynb"
CT_SLICES = 12
# Without the background-networking flags Chromium keeps trying to reach outside
# hosts; --headless is added by Playwright.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 90
RUN_TIMEOUT_MS = 180_000
# Status bar text of the kernel that scripts/lab.sh registers, once it is idle.
KERNEL_IDLE = r"Python 3 \(workbench\) \| Idle"
# Images the notebook draws: histograms, montage, slice viewer, slice profile.
NOTEBOOK_IMAGES = 4


@dataclass
class Lab:
    """A running lab: its URL, token, process and log."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def lab_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    studies = tmp_path_factory.mktemp("lab-studies")
    generate_studies(
        studies,
        patients=1,
        studies_per_patient=1,
        ct_slices=CT_SLICES,
        mr_slices=4,
        rows=48,
        columns=48,
    )
    out = tmp_path_factory.mktemp("lab-dataset") / "demo"
    ingest_folder(studies, out, workers=1)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_dataset: Path) -> Iterator[Lab]:
    """Start scripts/lab.sh over a copy of the exploration notebook; stop it after."""
    folder = tmp_path_factory.mktemp("lab")
    notebooks = folder / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, notebooks / NOTEBOOK)
    port = free_port()
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "WORKBENCH_LAB_PORT": str(port),
        "WORKBENCH_LAB_TOKEN": token,
        "WORKBENCH_DATASET": str(lab_dataset),
    }
    log = folder / "lab.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "lab.sh"), "--notebooks", str(notebooks)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Lab(f"http://127.0.0.1:{port}", token, process, log)
    try:
        wait_until_ready(server)
        yield server
    finally:
        stop_lab(process)


def wait_until_ready(lab: Lab) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            pytest.fail(f"lab exited with {lab.process.returncode}:\n{lab.log_text()}")
        try:
            response = requests.get(
                f"{lab.url}/api/status", params={"token": lab.token}, timeout=2
            )
            if response.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    pytest.fail(f"lab did not answer in {START_TIMEOUT_S} s:\n{lab.log_text()}")


def stop_lab(process: subprocess.Popen[bytes]) -> None:
    """End the lab and everything it started, by PID, whatever state it is in."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The lab runs in a session of its own, so its group holds only it and
        # its kernels.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)


def test_lab_settings(lab: Lab) -> None:
    no_token = requests.get(f"{lab.url}/api/contents", timeout=5)
    with_token = requests.get(
        f"{lab.url}/api/contents", params={"token": lab.token}, timeout=5
    )
    page = requests.get(f"{lab.url}/lab", params={"token": lab.token}, timeout=5).text
    listening = [
        connection.laddr.ip
        for connection in psutil.Process(lab.process.pid).net_connections("inet")
        if connection.status == psutil.CONN_LISTEN
    ]

    assert no_token.status_code == 403
    assert with_token.status_code == 200
    assert [item["name"] for item in with_token.json()["content"]] == [NOTEBOOK]
    assert '"news": {"disabled": true}' in page
    assert '"can_install": false' in page
    assert '"@jupyterlab/extensionmanager-extension"' in page
    assert listening
    assert set(listening) == {"127.0.0.1"}
    assert f"open http://127.0.0.1:{lab.url.rsplit(':', 1)[1]}/lab?token=" in (
        lab.log_text()
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_browser_runs_notebook(lab: Lab, tmp_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)

            # Wait for the .venv kernel to be connected: a click before that makes
            # JupyterLab ask which kernel to start.
            page.wait_for_function(
                "(pattern) => new RegExp(pattern).test("
                "document.querySelector('.jp-StatusBar-Widget')?.innerText ?? '')",
                arg=KERNEL_IDLE,
                timeout=60_000,
            )

            # Run all cells from the Run menu, then wait for the kernel to be idle
            # with no cell queued and every image loaded. Lab shows only cells near
            # the view, so cells scrolled away have blank prompts.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator('li[data-command="runmenu:run-all"]').click()
            try:
                page.wait_for_function(
                    """([count, pattern]) => {
                        const prompts = [...document.querySelectorAll(
                            '.jp-CodeCell .jp-InputArea-prompt')];
                        const busy = prompts.some(p => p.textContent.includes('*'));
                        const status = document.querySelector('.jp-StatusBar-Widget');
                        const idle = new RegExp(pattern).test(status?.innerText ?? '');
                        const images = [...document.querySelectorAll(
                            '.jp-OutputArea-output img')];
                        return idle && !busy && images.length >= count
                            && images.every(i => i.complete && i.naturalWidth > 0);
                    }""",
                    arg=[NOTEBOOK_IMAGES, KERNEL_IDLE],
                    timeout=RUN_TIMEOUT_MS,
                )
            except PlaywrightTimeoutError:
                page.screenshot(path=str(ARTIFACTS / "lab-timeout.png"))
                pytest.fail(
                    "the notebook did not finish in the browser; see"
                    f" {ARTIFACTS / 'lab-timeout.png'} and the lab log:\n"
                    f"{lab.log_text()[-3000:]}"
                )
            ran_s = time.monotonic() - started

            errors = page.locator(
                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
            ).all_inner_texts()
            montage_cell = page.locator(".jp-CodeCell", has_text="ds.show(series_uid")
            montage = montage_cell.locator(".jp-OutputArea-output img").first
            size = montage.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            montage.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "lab-explore-dataset.png"))
            montage.screenshot(path=str(ARTIFACTS / "lab-montage.png"))

            # The slice viewer responds to the keyboard through the running kernel.
            viewer = page.locator(".jp-CodeCell", has_text="ds.viewer(series_uid")
            caption = viewer.locator(".widget-label", has_text=" of ").first
            before = caption.inner_text()
            viewer.locator(".noUi-handle").first.press("ArrowRight")
            page.wait_for_function(
                "([element, text]) => element.textContent !== text",
                arg=[caption.element_handle(), before],
                timeout=30_000,
            )
            after = caption.inner_text()
            viewer.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "lab-slice-viewer.png"))
        finally:
            context.close()

    assert errors == []
    assert size[0] >= 600
    assert size[1] >= 200
    assert before.startswith(f"slice {CT_SLICES // 2 + 1} of {CT_SLICES}")
    assert after.startswith(f"slice {CT_SLICES // 2 + 2} of {CT_SLICES}")
    print(f"notebook ran in the browser in {ran_s:.1f} s")

    # Stop the lab as Ctrl-C would; its kernel, the .venv Python, ends with it.
    kernels = psutil.Process(lab.process.pid).children(recursive=True)
    kernel_pythons = {kernel.cmdline()[0] for kernel in kernels}
    lab.process.send_signal(signal.SIGINT)
    lab.process.wait(STOP_TIMEOUT_S)
    _gone, alive = psutil.wait_procs(kernels, timeout=10)

    assert kernel_pythons == {str(ROOT / ".venv" / "bin" / "python")}
    assert alive == []
    assert lab.process.returncode == 0
