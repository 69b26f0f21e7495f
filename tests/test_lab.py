"""`make lab` as a person starts it: JupyterLab asks no "get notified about news?" question over every page, and
its kernels talk to it over Unix sockets, so no kernel start warns "running over TCP without encryption"."""
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import workbook
from test_browser import free_port, wait_for_server


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The server `make lab` starts (its command line, from `make -n`), with its settings in a temporary folder
    and on a free port."""
    home = tmp_path_factory.mktemp("make-lab")
    overrides = home / "app-settings" / "overrides.json"
    make = ["make", "-s", f"LAB_OVERRIDES={overrides}"]
    subprocess.run(make + [str(overrides)], cwd=workbook.ROOT, check=True)
    command = subprocess.run(make + ["-n", "lab"], cwd=workbook.ROOT, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1].split()
    assert command[1:2] == ["lab"] and command[-1] == "notebooks/"
    (home / "notebooks").mkdir()
    port, token = free_port(), secrets.token_hex(16)
    # a short runtime folder, as a home's is: a kernel's sockets live there, and a Unix socket's path has at most 107
    # characters (pytest's temporary folders under xdist are too long for the kernel's name after them)
    runtime = Path(tempfile.mkdtemp(prefix="jr-"))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTERLAB_SETTINGS_DIR": str(home / "user"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log = home / "lab.log"
    server = subprocess.Popen(command[:-1] + [
        str(home / "notebooks"), "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
        f"--LabApp.app_settings_dir={overrides.parent}"], cwd=workbook.ROOT, env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, token, server, log)
        yield dict(url=url, token=token, runtime=runtime, log=log)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(runtime, ignore_errors=True)


def api(lab, path, data=None):
    request = urllib.request.Request(f"{lab['url']}{path}?token={lab['token']}", method="POST" if data else "GET",
                                     data=json.dumps(data).encode() if data else None,
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def test_no_news_question(lab):
    """JupyterLab asks about news while fetchNews is "none" (unset); make lab's overrides answer it."""
    plugin = api(lab, "/lab/api/settings/@jupyterlab/apputils-extension:notification")
    defaults = {name: spec.get("default") for name, spec in plugin["schema"]["properties"].items()}
    assert plugin["settings"].get("fetchNews", defaults["fetchNews"]) == "false"  # what the page reads: composite
    assert plugin["settings"].get("checkForUpdates", defaults["checkForUpdates"]) is False


def test_kernels_run_over_unix_sockets_without_the_tcp_warning(lab):
    from jupyter_client import BlockingKernelClient
    kernel = api(lab, "/api/kernels", {"name": "python3"})
    connection = lab["runtime"] / f"kernel-{kernel['id']}.json"
    for _ in range(120):
        if connection.is_file():
            break
        time.sleep(0.5)
    assert json.loads(connection.read_text())["transport"] == "ipc"
    client = BlockingKernelClient(connection_file=str(connection))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        reply = client.execute_interactive("6 * 7", timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
    assert "without encryption" not in lab["log"].read_text()
