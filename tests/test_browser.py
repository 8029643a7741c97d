"""A real browser: JupyterLab on a free localhost port, headless Chromium through chromedriver (selenium).

One test opens ``notebooks/00_seed_tasks.ipynb`` from the repository, runs all cells from the Run menu and
finds the seed summary table in the page; another runs ``notebooks/07_report.ipynb`` on a copy of the smoke
run and checks that every image in its outputs loaded. The notebooks write into a temporary run folder
(``REFINE_AF_RUN_DIR``). JupyterLab runs with the pre-save hook of ``make lab``: the test saves notebook 00
after Run All and checks that the committed file is byte-identical (outputs never reach ``notebooks/``).

Without Debian's ``chromium`` and ``chromium-driver`` the test is skipped with that reason, or fails when
``REFINE_AF_REQUIRE_BROWSER=1`` (set by ``.ci/run``). ``REFINE_AF_UPDATE_SCREENSHOT=1`` also saves the
screenshot as ``docs/jupyterlab.png`` (the README's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO_ROOT
from refine_af_utils.notebook import PRE_SAVE_HOOK

NOTEBOOK = "notebooks/00_seed_tasks.ipynb"
SCREENSHOT = REPO_ROOT / "docs" / "jupyterlab.png"
# Chromium as root in a container: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip (fail under REFINE_AF_REQUIRE_BROWSER=1) saying what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "the selenium package (make install)"
    else:
        missing = ", ".join(name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if not path)
    if missing:
        reason = (f"no browser: {missing} not installed (Debian: apt-get install chromium chromium-driver; "
                  ".ci/run installs them)")
        if os.environ.get("REFINE_AF_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"jupyter lab did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _jupyter_lab(tmp_path: Path, run_dir: Path):
    """``jupyter lab`` from the venv, on 127.0.0.1, in the repository, with a token, notebooks writing into
    ``run_dir`` (``REFINE_AF_RUN_DIR``); stopped afterwards."""
    port, token = _free_port(), "refine-af-browser-test"
    settings = tmp_path / "lab-settings" / "@jupyterlab"
    for plugin, values in (("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False}),):
        (settings / f"{plugin}.jupyterlab-settings").parent.mkdir(parents=True, exist_ok=True)
        (settings / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    env = {**os.environ, "REFINE_AF_PARAMS": "params/smoke.yaml", "REFINE_AF_RUN_DIR": str(run_dir),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    log = tmp_path / "jupyter-lab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={REPO_ROOT}", f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
               f"--ContentsManager.pre_save_hook={PRE_SAVE_HOOK}",  # as `make lab` (tested below)
               # nothing leaves the machine: no extension index, update check or news feed
               "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")  # CI runs as root
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", process, log)
        yield f"http://127.0.0.1:{port}", token, run_dir
    finally:
        process.terminate()  # the server shuts its kernels down
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def jupyter_lab(tmp_path: Path):
    """JupyterLab with notebooks writing into a fresh ``<tmp>/run``."""
    with _jupyter_lab(tmp_path, tmp_path / "run") as lab:
        yield lab


@pytest.fixture
def browser() -> tuple[str, str]:
    """chromium and chromedriver (checked before JupyterLab starts)."""
    return _browser()


def _chromium(chromium: str, chromedriver: str, profile: Path) -> Any:
    """A headless Chromium driven through chromedriver (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def _open_and_run_all(driver: Any, url: str, token: str, notebook: str, timeout: float = 120) -> Any:
    """Open ``notebook`` in JupyterLab, wait for its kernel, and click Run > Run All Cells; the wait object."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(f"{url}/lab/tree/{notebook}?token={token}")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    wait.until(ec.presence_of_element_located(  # the kernel has started
        (By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")))

    def accept_kernel_dialog() -> None:
        """With the refine-af kernel registered beside python3, JupyterLab may ask which to use: accept."""
        time.sleep(2)
        for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"):
            button.click()

    accept_kernel_dialog()
    run_menu = "//div[contains(@class,'lm-MenuBar-itemLabel') and normalize-space(text())='Run']"
    wait.until(ec.element_to_be_clickable((By.XPATH, run_menu))).click()
    wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, "li.lm-Menu-item[data-command='runmenu:run-all']"))).click()
    accept_kernel_dialog()
    return wait


def _restore_if_saved(notebook: str, committed: bytes) -> None:
    """Fail (after restoring it) when JupyterLab wrote into the committed notebook."""
    if (REPO_ROOT / notebook).read_bytes() != committed:  # never leave outputs in the committed notebook
        (REPO_ROOT / notebook).write_bytes(committed)
        pytest.fail(f"{notebook} was saved by JupyterLab during the test (restored)")


@pytest.mark.slow  # runs a notebook
def test_notebook_00_runs_in_jupyterlab_in_headless_chromium(browser, jupyter_lab, tmp_path):
    chromium, chromedriver = browser
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    url, token, run_dir = jupyter_lab
    committed = (REPO_ROOT / NOTEBOOK).read_bytes()
    driver = _chromium(chromium, chromedriver, tmp_path / "chromium-profile")
    try:
        wait = _open_and_run_all(driver, url, token, NOTEBOOK)
        try:
            table = wait.until(ec.presence_of_element_located(
                (By.XPATH, "//div[contains(@class,'jp-OutputArea-output')]//table[.//td[normalize-space()="
                           "'classification tasks']]")))
        except TimeoutException:
            driver.save_screenshot(str(tmp_path / "timeout.png"))
            shown = [e.text[:500] for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
            pytest.fail(f"no seed summary table after Run All; outputs: {shown}; screenshot {tmp_path / 'timeout.png'}")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", table)
        rows = {r.find_element(By.XPATH, "./td[1]").text: r.find_element(By.XPATH, "./td[2]").text
                for r in table.find_elements(By.XPATH, ".//tbody/tr")}
        assert float(rows["tasks"]) == 36 and float(rows["classification tasks"]) == 10  # the 36 bundled seeds
        errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type*='error']")
        assert not errors, errors[0].text
        # Save (Ctrl+S): the pre-save hook writes the committed notebook back without outputs, byte for byte
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        saved_before = (REPO_ROOT / NOTEBOOK).stat().st_mtime_ns
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        deadline = time.time() + 30
        while (REPO_ROOT / NOTEBOOK).stat().st_mtime_ns == saved_before and time.time() < deadline:
            time.sleep(0.5)
        assert (REPO_ROOT / NOTEBOOK).stat().st_mtime_ns != saved_before, "Ctrl+S did not save the notebook"
        time.sleep(1)  # let the layout settle for the screenshot
        shot = tmp_path / "jupyterlab.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("REFINE_AF_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copy(shot, SCREENSHOT)
    finally:
        driver.quit()
        _restore_if_saved(NOTEBOOK, committed)
    assert (run_dir / "seed_tasks" / "seed_summary.csv").is_file()  # written where REFINE_AF_RUN_DIR says


@pytest.mark.slow  # needs the smoke run, then runs notebook 07
def test_notebook_07_shows_every_figure_of_the_report_in_jupyterlab(browser, smoke_run, tmp_path):
    """Every image in notebook 07's outputs loads (none is a relative link that 404s against notebooks/)."""
    chromium, chromedriver = browser
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    notebook = "notebooks/07_report.ipynb"
    smoke_run.require("07")
    run_dir = tmp_path / "smoke"  # a copy: the notebook rewrites the report
    shutil.copytree(smoke_run.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
    figures = sorted(p.name for p in run_dir.glob("fig_*.png"))
    assert figures
    committed = (REPO_ROOT / notebook).read_bytes()
    with _jupyter_lab(tmp_path, run_dir) as (url, token, _):
        driver = _chromium(chromium, chromedriver, tmp_path / "chromium-profile")
        try:
            wait = _open_and_run_all(driver, url, token, notebook, timeout=300)
            try:  # the last cell's output: the reproduction check's text (no reference run is set)
                wait.until(ec.presence_of_element_located(
                    (By.XPATH, "//div[contains(@class,'jp-OutputArea-output')][contains(., 'No reference run set')]")))
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / "timeout.png"))
                pytest.fail(f"notebook 07 did not finish after Run All; screenshot {tmp_path / 'timeout.png'}")
            errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type*='error']")
            assert not errors, errors[0].text
            images = driver.execute_script(
                "return Array.from(document.querySelectorAll('.jp-OutputArea-output img'))"
                ".map(img => [img.getAttribute('src').slice(0, 40), img.complete && img.naturalWidth > 0]);")
            broken = [src for src, loaded in images if not loaded]
            assert not broken, f"{len(broken)} of {len(images)} images did not load: {broken}"
            assert len(images) >= len(figures), f"{len(images)} images shown for the report's {len(figures)} figures"
        finally:
            driver.quit()
            _restore_if_saved(notebook, committed)


def test_make_lab_runs_jupyter_with_the_pre_save_hook():
    """``make lab`` is the JupyterLab the browser test drives: the same hook keeps notebooks/ free of outputs."""
    lab_target = (REPO_ROOT / "Makefile").read_text().split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert f"--ContentsManager.pre_save_hook={PRE_SAVE_HOOK}" in lab_target
