"""The example notebook, executed top to bottom by a real Jupyter kernel, and the one-command demo."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import colab_remote
from colab_remote import _net, _ssh

from .conftest import needs_root, needs_sshd, ssh_run

pytestmark = [needs_root, needs_sshd]
NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "Colab_SSH.ipynb"


def _outputs_text(nb: nbformat.NotebookNode) -> str:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append(out["text"])
            data = out.get("data", {})
            if "text/plain" in data:
                texts.append(data["text/plain"])
            if out.get("output_type") == "error":
                texts.append("\n".join(out.get("traceback", [])))
    return "\n".join(texts)


def test_notebook_is_saved_without_outputs_and_has_tagged_parameters() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    names = set(re.findall(r"(?m)^([A-Z_]+) = .*# @param", params[0].source))
    assert {"INSTALL_FROM", "SSHD_USER", "SSHD_PORT", "SERVER", "SERVER_PORT", "SERVER_PASSWORD",
            "REMOTE_PORT", "PROJECT_DIR", "BACKUP_DIR", "STATE_DIR", "STOP_AT_END",
            "SERVER_HOST_KEY"} <= names


def test_notebook_run_all_leaves_everything_running_and_pins_the_host_key() -> None:
    """The saved form's defaults: "run all" keeps sshd, tunnel and mirror up; the server's key
    from the form reaches reverse_forward and mirror."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    form = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source
    assert re.search(r"(?m)^STOP_AT_END = False  # @param", form)
    assert re.search(r'(?m)^SERVER_HOST_KEY = ""  # @param', form)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for call in ("reverse_forward(", "mirror("):
        block = code[code.index(call):]
        assert "host_key=host_key" in block[:block.index("\n)")], call
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "trusts whatever key it sees first" in text and "git+https://" in text


def test_notebook_runs_top_to_bottom(tmp_path, server, make_user) -> None:
    runtime_user = make_user()
    state = tmp_path / "state"
    project = tmp_path / "content" / "project"
    remote_port = _net.free_port()
    values = {
        "INSTALL_FROM": "", "SSHD_USER": runtime_user.name, "SSHD_PORT": _net.free_port(),
        "SSHD_LISTEN": "127.0.0.1", "SERVER": f"{server.user.name}@127.0.0.1", "SERVER_PORT": server.port,
        "SERVER_PASSWORD": server.user.password, "REMOTE_PORT": remote_port, "PROJECT_DIR": str(project),
        "BACKUP_DIR": "backup/project", "STATE_DIR": str(state), "STOP_AT_END": False,
        "SERVER_HOST_KEY": _ssh.fingerprint(server.host_key_line),
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    client = NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
        text = _outputs_text(nb)
        assert "self-check OK" in text, text
        password = re.search(r"password:\s+([A-Za-z0-9]{20})", text).group(1)
        # From outside, as a laptop would: through the server and the tunnel, into the runtime.
        jump = (f"{server.user.name}@127.0.0.1:{server.port}", server.user.password)
        out = ssh_run(remote_port, runtime_user.name, password, "id -un", known_hosts=tmp_path / "kh",
                      jump=jump)
        assert out.splitlines()[-1] == runtime_user.name
        arrived = server.user.home / "backup" / "project" / "hello-from-colab.txt"
        assert arrived.read_text() == "written in the notebook\n"
        # The kernel is gone (nbclient shut it down): what it started still runs and is found.
        found = colab_remote.status(state)
        assert found.sshd is not None and found.sshd.alive and len(found.tunnels) == 1
        # SERVER_HOST_KEY pinned the server's key for the tunnel and the mirror
        (tunnel,) = found.tunnels
        assert tunnel.config.options["StrictHostKeyChecking"] == "yes"
        assert str(tunnel.config.options["UserKnownHostsFile"]).endswith("known_hosts.pinned")
        (mirrored,) = found.mirrors
        assert mirrored.config.pinned is True
    finally:
        colab_remote.stop_all(state)


def test_demo_check_mode(tmp_path) -> None:
    demo = [sys.executable, "-m", "colab_remote", "demo", "--check", "--base-dir", str(tmp_path)]
    done = subprocess.run(demo, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in ("self-check OK", "arrived", "ssh -J", "Host colab-demo", "every check passed"):
        assert expected in done.stdout
    # One ~/.ssh/config block, and the demo says what it is for.
    assert re.findall(r"(?m)^\s*Host ", done.stdout) == ["Host "]
    assert "VS Code Remote-SSH" in done.stdout
    # Its throwaway accounts are gone (only those: other accounts may come and go meanwhile).
    named = re.search(r"throwaway accounts: (\S+) (\S+)", done.stdout)
    assert named is not None
    names = set(named.groups())
    assert names & {p.pw_name for p in pwd.getpwall()} == set()
    assert list(tmp_path.iterdir()) == []  # its folder removed


def test_readme_demo_command(tmp_path) -> None:
    """The README's first command, as written (bootstrap, then the demo), in its --check mode."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert "\nbash demo.sh  " in readme and "sudo bash demo.sh" not in readme  # as root, no sudo needed
    done = subprocess.run(["bash", str(root / "demo.sh"), "--check", "--base-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo: every check passed" in done.stdout


def test_demo_needs_root_message(as_nobody) -> None:
    nobody, env = as_nobody
    done = subprocess.run([*nobody, "-m", "colab_remote", "demo", "--check"],
                          capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert done.returncode == 1 and "needs root" in done.stderr, done.stderr


