"""Writes examples/Colab_SSH.ipynb (saved without outputs). Edit here, then run this script."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# SSH into this Colab runtime, and never lose your project

This notebook uses [colab-remote](https://pypi.org/project/colab-remote/) to

1. start an **SSH server** inside this runtime (`start_sshd`),
2. dial out to **a server you own** and forward a port there back to it, so you can log in from your
   laptop or VS Code through that server (`reverse_forward`); it reconnects by itself,
3. **mirror** a project folder to that server, so nothing is lost when the runtime is recycled, and
   restore it into a fresh runtime (`mirror(..., restore=True)`).

You need a server with a public address that you can `ssh` into (a VPS, a machine at home with a
forwarded port, or a Compute Engine VM: see the end of this notebook).

> **Colab's terms:** Colab does not allow SSH and remote shells on the free tier; they are allowed
> with paid compute units (Colab Pro / Pay As You Go). Decide knowingly before you run this.

Run the cells top to bottom. Fill in the form first."""),
    new_markdown_cell("""## 1. Parameters

`SERVER` is your server as `user@host`. Leave `SERVER_PASSWORD` empty: the notebook then reads the Colab
secret `SERVER_PASSWORD` (🔑 in the left sidebar) or asks you, so the password is never saved in the
notebook. With key login to your server, put the private key's path in `SERVER_IDENTITY_FILE`.
`AUTHORIZED_KEYS` (your laptop's public key, e.g. `~/.ssh/id_ed25519.pub`) turns password login to the
runtime off."""),
    new_code_cell("""INSTALL_FROM = "colab-remote"  # @param {type:"string"}
SSHD_USER = "root"  # @param {type:"string"}
SSHD_PORT = 22  # @param {type:"integer"}
SSHD_LISTEN = ""  # @param {type:"string"}
AUTHORIZED_KEYS = ""  # @param {type:"string"}
HOST_KEYS_DIR = ""  # @param {type:"string"}
SERVER = "you@your-server.example.org"  # @param {type:"string"}
SERVER_PORT = 22  # @param {type:"integer"}
SERVER_PASSWORD = ""  # @param {type:"string"}
SERVER_IDENTITY_FILE = ""  # @param {type:"string"}
VIA = "ssh"  # @param ["ssh", "gcloud"]
GCE_ZONE = ""  # @param {type:"string"}
GCE_PROJECT = ""  # @param {type:"string"}
REMOTE_PORT = 20022  # @param {type:"integer"}
PROJECT_DIR = "/content/project"  # @param {type:"string"}
BACKUP_DIR = "backup/project"  # @param {type:"string"}
STATE_DIR = "~/.colab_remote"  # @param {type:"string"}
STOP_AT_END = True  # @param {type:"boolean"}""", metadata={"tags": ["parameters"]}),
    new_markdown_cell("""## 2. Install colab-remote

Skipped when `INSTALL_FROM` is empty (the package is already installed)."""),
    new_code_cell("""import subprocess, sys

if INSTALL_FROM:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", INSTALL_FROM], check=True)
import colab_remote

print("colab-remote", colab_remote.__version__)"""),
    new_markdown_cell("""## 3. Start the SSH server in this runtime

Installs openssh-server if it is missing, writes its own config (the system's `/etc/ssh/sshd_config`
is not touched), generates a strong password (or uses your public key) and prints it with the host key
fingerprints; re-running this cell keeps the password. SSH sessions see this notebook's environment
(`nvidia-smi`, CUDA, `PATH`) as it is now; after setting more variables, run
`colab_remote.refresh_environment()`.
`HOST_KEYS_DIR` keeps the same host key across runtimes, so your `known_hosts` stays valid. Best:
`colab-secret:SSH_HOST_KEY`, a Colab secret holding a private key made once with
`ssh-keygen -t ed25519 -N '' -f colab_host_key`. A folder on Google Drive (e.g.
`/content/drive/MyDrive/colab-ssh-keys`) works too, but holds the private keys in plain text: anyone
who can read that folder can pose as this runtime."""),
    new_code_cell("""from colab_remote import start_sshd

sshd = start_sshd(
    SSHD_PORT,
    user=SSHD_USER,
    authorized_keys=AUTHORIZED_KEYS or None,
    state_dir=STATE_DIR,
    host_keys=HOST_KEYS_DIR or None,
    listen_address=SSHD_LISTEN or None,
)"""),
    new_markdown_cell("""## 4. Dial out to your server

The runtime connects to `SERVER` and forwards its port `REMOTE_PORT` back to the runtime's SSH server.
The tunnel runs in the background, outlives this cell and a kernel restart, and reconnects by itself
(after a network hiccup, a server reboot, a dead link). The first connection records the server's host
key; later ones check it."""),
    new_code_cell("""import getpass

def server_password():
    if SERVER_PASSWORD or SERVER_IDENTITY_FILE:
        return SERVER_PASSWORD or None
    try:
        from google.colab import userdata  # Colab Secrets
        return userdata.get("SERVER_PASSWORD")
    except Exception:
        pass
    return getpass.getpass(f"password for {SERVER}: ") or None

password = server_password()"""),
    new_code_cell("""from colab_remote import reverse_forward

tunnel = reverse_forward(
    SERVER,
    port=SERVER_PORT,
    remote_port=REMOTE_PORT,
    password=password,
    identity_file=SERVER_IDENTITY_FILE or None,
    via=VIA,
    zone=GCE_ZONE or None,
    project=GCE_PROJECT or None,
    state_dir=STATE_DIR,
)"""),
    new_markdown_cell("""### Connect from your laptop

```
ssh -J you@your-server -p 20022 root@localhost
```

(the exact command is printed above as `tunnel.connection_string`). For **VS Code Remote-SSH**, paste
the block below into `~/.ssh/config` and connect to the host `colab`."""),
    new_code_cell("""print(tunnel.ssh_config(alias="colab"))"""),
    new_markdown_cell("""## 5. Keep the project safe

`mirror()` first restores the server's copy into `PROJECT_DIR` (a fresh runtime resumes where the last one
stopped; newer local files are kept), then pushes every change to `SERVER:BACKUP_DIR` within milliseconds.
Files it deletes or overwrites on the server go to a `.colab-remote-trash` folder there, so nothing is
lost. `.git` is mirrored too."""),
    new_code_cell("""import os
from colab_remote import mirror

os.makedirs(PROJECT_DIR, exist_ok=True)
backup = mirror(
    PROJECT_DIR,
    f"{SERVER}:{BACKUP_DIR}",
    port=SERVER_PORT,
    password=password,
    identity_file=SERVER_IDENTITY_FILE or None,
    state_dir=STATE_DIR,
    restore=True,
)
with open(os.path.join(PROJECT_DIR, "hello-from-colab.txt"), "w") as f:
    f.write("written in the notebook\\n")
backup.flush(timeout=30)
backup"""),
    new_markdown_cell("""## 6. Check the whole path

Logs in the way your laptop will (through the server and the tunnel into this runtime) and runs
`nvidia-smi` when there is a GPU, else `hostname`."""),
    new_code_cell("""colab_remote.self_check(sshd, tunnel, server_password=password)"""),
    new_markdown_cell("""## 7. Status

Everything running from `STATE_DIR`, also after a kernel restart. `colab_remote.stop_all()` stops it;
each handle's `.logs()` shows its log."""),
    new_code_cell("""colab_remote.status(STATE_DIR)"""),
    new_markdown_cell("""## 8. Stop

Runs only when `STOP_AT_END` is set. Leave it off to keep working over SSH after the notebook ends."""),
    new_code_cell("""if STOP_AT_END:
    backup.stop(flush=True)
    colab_remote.stop_all(STATE_DIR)"""),
    new_markdown_cell("""## Using a Compute Engine VM as the server

No server of your own? Create a small VM with an external IP, then in this notebook:

```python
from colab_remote import gcloud_setup
gcloud_setup(project="my-project", zone="us-central1-a", account="me@example.com")
!gcloud auth login
```

and set `VIA = "gcloud"`, `SERVER = "you@instance-name"`, `GCE_ZONE`, `GCE_PROJECT` in the form. The
tunnel then runs through `gcloud compute ssh` (which manages the SSH key for you) and the connection string
names the VM's external address."""),
]

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": []},
})
out = Path(__file__).resolve().parent.parent / "examples" / "Colab_SSH.ipynb"
nbformat.write(nb, out)
print("wrote", out)
