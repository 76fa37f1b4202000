"""A stand-in Compute Engine API on 127.0.0.1, enough for the real ``gcloud compute ssh``.

The real gcloud CLI is pointed at it with ``api_endpoint_overrides/compute`` and
``auth/disable_credentials``; it answers exactly what gcloud 528 asks during
``gcloud compute ssh USER@INSTANCE --zone Z --project P`` (learnt by running it against this
server and reading its ``--verbosity=debug`` output):

1. ``GET  projects/P/zones/Z/instances/I``                the instance (natIP, metadata, id)
2. ``GET  projects/P``                                    project metadata (``ssh-keys``)
3. ``GET  projects/P/zones/Z/instances/I/getGuestAttributes?queryPath=hostkeys/``
   the host keys, asked only because the instance metadata has ``enable-guest-attributes``
4. ``POST projects/P/setCommonInstanceMetadata``          when gcloud's key is not there yet
5. ``POST projects/P/global/operations/OP/wait``          the operation 4 returned (RUNNING)
6. ``GET  projects/P``                                    the waiter's follow-up

``gcloud config set compute/zone|region`` validates the value with ``zones.get`` /
``regions.get``; ``instances.setMetadata`` and ``zoneOperations`` are served for instances that
block project keys. Every request is recorded in ``.requests``; anything else gets a 404 at once
(gcloud fails fast instead of retrying).

Like GCE's guest agent, the fake installs each ``user:key`` of the ``ssh-keys`` metadata into that
user's ``~/.ssh/authorized_keys`` through ``install_key`` (the test's throwaway user). An entry
gcloud wrote with an expiry (``--ssh-key-expiration``/``--ssh-key-expire-after``) reads
``user:TYPE KEY google-ssh {"userName":"user","expireOn":"2030-01-31T00:00:00+0000"}``: like the
agent, the fake installs ``TYPE KEY`` without that suffix, records the expiry in ``.expiries``
and skips an entry that has expired already.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import threading
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PREFIX = "/compute/v1/"


def _fingerprint(text: str) -> str:
    # Metadata fingerprints are bytes fields: gcloud refuses anything that is not base64.
    return base64.b64encode(text.encode()).decode()


class FakeCompute:
    """One project with one zone and one instance, served over HTTP on 127.0.0.1."""

    def __init__(self, *, project: str = "fake-project", zone: str = "fake-zone-a",
                 instance: str = "fake-vm", nat_ip: str = "127.0.0.1",
                 host_keys: list[str] | None = None,
                 install_key: Callable[[str, str], None] | None = None) -> None:
        self.project = project
        self.zone = zone
        self.region = zone.rsplit("-", 1)[0]
        self.instance = instance
        self.instance_id = str(zlib.crc32(instance.encode()) + 4_000_000_000_000)
        self.nat_ip = nat_ip
        self.host_keys = host_keys or []
        self.install_key = install_key
        self.project_metadata: dict[str, str] = {}
        self.instance_metadata: dict[str, str] = {"enable-guest-attributes": "TRUE"}
        self.requests: list[str] = []
        self.installed: list[tuple[str, str]] = []
        self.expiries: dict[tuple[str, str], datetime.datetime] = {}
        self._fingerprints = itertools.count(1)
        self._operations: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> FakeCompute:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = fake._answer(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-compute", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeCompute:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the fake first"
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        """The value for ``api_endpoint_overrides/compute``."""
        return f"http://127.0.0.1:{self.port}{_PREFIX}"

    # --- resources -----------------------------------------------------------------------------

    def _link(self, path: str) -> str:
        return self.endpoint + path

    @staticmethod
    def _metadata(items: dict[str, str], fingerprint: str) -> dict[str, Any]:
        return {"kind": "compute#metadata", "fingerprint": fingerprint,
                "items": [{"key": k, "value": v} for k, v in items.items()]}

    def _instance(self) -> dict[str, Any]:
        zone_path = f"projects/{self.project}/zones/{self.zone}"
        return {
            "kind": "compute#instance", "id": self.instance_id, "name": self.instance,
            "status": "RUNNING", "zone": self._link(zone_path),
            "selfLink": self._link(f"{zone_path}/instances/{self.instance}"),
            "machineType": self._link(f"{zone_path}/machineTypes/e2-micro"),
            "networkInterfaces": [{
                "kind": "compute#networkInterface", "name": "nic0", "networkIP": "10.128.0.2",
                "network": self._link(f"projects/{self.project}/global/networks/default"),
                "accessConfigs": [{"kind": "compute#accessConfig", "name": "External NAT",
                                   "type": "ONE_TO_ONE_NAT", "natIP": self.nat_ip}],
            }],
            "metadata": self._metadata(self.instance_metadata, _fingerprint("instance")),
        }

    def _project(self) -> dict[str, Any]:
        return {
            "kind": "compute#project", "id": "1234567890", "name": self.project,
            "selfLink": self._link(f"projects/{self.project}"),
            "commonInstanceMetadata": self._metadata(self.project_metadata, _fingerprint(
                f"project-{next(self._fingerprints)}")),
        }

    def _operation(self, kind: str, target: str, zone: bool) -> dict[str, Any]:
        name = f"operation-{len(self._operations) + 1}"
        scope = f"projects/{self.project}/zones/{self.zone}" if zone else f"projects/{self.project}/global"
        op: dict[str, Any] = {
            "kind": "compute#operation", "id": str(len(self._operations) + 7000), "name": name,
            "operationType": kind, "status": "RUNNING", "progress": 0, "targetLink": target,
            "selfLink": self._link(f"{scope}/operations/{name}"),
            "insertTime": "2026-01-01T00:00:00.000-00:00",
        }
        if zone:
            op["zone"] = self._link(f"projects/{self.project}/zones/{self.zone}")
        self._operations[name] = op
        return op

    def _apply_keys(self, items: dict[str, str]) -> None:
        """What the guest agent does: install ``user:key`` lines for the users it knows."""
        for line in (items.get("ssh-keys", "") + "\n" + items.get("sshKeys", "")).splitlines():
            user, colon, key = line.strip().partition(":")
            words = key.split(None, 3)
            if len(words) == 4 and words[2] == "google-ssh":
                expire_on = json.loads(words[3])["expireOn"]
                when = datetime.datetime.strptime(expire_on, "%Y-%m-%dT%H:%M:%S%z")
                if when <= datetime.datetime.now(datetime.timezone.utc):
                    continue
                key = " ".join(words[:2])
                self.expiries[(user, key)] = when
            if not colon or (user, key) in self.installed:
                continue
            self.installed.append((user, key))
            if self.install_key is not None:
                self.install_key(user, key)

    # --- routing -------------------------------------------------------------------------------

    def _answer(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        with self._lock:
            self.requests.append(f"{method} {url.path}" + (
                f"?queryPath={query['queryPath'][0]}" if "queryPath" in query else ""))
            if not url.path.startswith(_PREFIX):
                return self._not_found(url.path)
            parts = url.path[len(_PREFIX):].strip("/").split("/")
            if len(parts) < 2 or parts[0] != "projects" or parts[1] != self.project:
                return self._not_found(url.path)
            rest = parts[2:]
            payload = json.loads(body) if body else {}
            inst = ["zones", self.zone, "instances", self.instance]
            if method == "GET" and rest == []:
                return 200, self._project()
            if method == "POST" and rest == ["setCommonInstanceMetadata"]:
                self.project_metadata = {i["key"]: i.get("value", "") for i in payload.get("items", [])}
                self._apply_keys(self.project_metadata)
                return 200, self._operation("compute.projects.setCommonInstanceMetadata",
                                            self._link(f"projects/{self.project}"), zone=False)
            if method == "GET" and rest == inst:
                return 200, self._instance()
            if method == "POST" and rest == [*inst, "setMetadata"]:
                self.instance_metadata = {i["key"]: i.get("value", "") for i in payload.get("items", [])}
                self._apply_keys(self.instance_metadata)
                return 200, self._operation("compute.instances.setMetadata",
                                            self._instance()["selfLink"], zone=True)
            if method == "GET" and rest == [*inst, "getGuestAttributes"]:
                if query.get("queryPath") != ["hostkeys/"]:
                    return self._not_found(url.path)
                return 200, {
                    "kind": "compute#guestAttributes", "queryPath": "hostkeys/",
                    "selfLink": self._link("/".join(parts)),
                    "queryValue": {"items": [
                        {"namespace": "hostkeys", "key": line.split()[0], "value": line.split()[1]}
                        for line in self.host_keys]},
                }
            if method == "GET" and rest == ["zones", self.zone]:
                return 200, {"kind": "compute#zone", "name": self.zone, "status": "UP",
                             "region": self._link(f"projects/{self.project}/regions/{self.region}")}
            if method == "GET" and rest == ["regions", self.region]:
                return 200, {"kind": "compute#region", "name": self.region, "status": "UP"}
            # global/operations/NAME[/wait] and zones/Z/operations/NAME[/wait]
            scope_len = 1 if rest[:1] == ["global"] else 2 if rest[:2] == ["zones", self.zone] else 0
            ops = rest[scope_len:]
            if scope_len and len(ops) in (2, 3) and ops[0] == "operations" and ops[1] in self._operations:
                op = self._operations[ops[1]]
                if ops[2:] == ["wait"] and method == "POST":
                    op.update(status="DONE", progress=100, endTime="2026-01-01T00:00:01.000-00:00")
                    return 200, op
                if len(ops) == 2 and method == "GET":
                    return 200, op
            return self._not_found(url.path)

    @staticmethod
    def _not_found(path: str) -> tuple[int, dict[str, Any]]:
        message = f"The resource '{path}' was not found (fake compute)"
        return 404, {"error": {"code": 404, "message": message,
                               "errors": [{"message": message, "domain": "global", "reason": "notFound"}]}}
