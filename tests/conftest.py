"""Test set-up shared by every test module.

Eight fake CPU devices so sharding tests can build real meshes; absl flags marked parsed so
grain's worker processes and absl-using code do not raise UnparsedFlagAccessError.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------- data fixtures (segmentation)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory):
    """Records dir (``pathlib.Path``) of a tiny parts world exported with ``gt`` masks.

    The demo config shrunk to 4 classes, 64 x 64 images, 24 train images (2 shards) and 8
    test images (1 shard); ids 0..23 train and 24..31 test; 4-6 masks per image (one per
    part, at most 8), ground-truth part maps and decisive parts in every record, and
    ``dataset_info.json``. Read-only: copy it before changing anything.
    """
    from configs import demo
    from segmentation import export

    base = tmp_path_factory.mktemp("tiny_parts_world")
    config = demo.get_config()
    config.dataset.root = str(base / "dataset")
    config.dataset.records_dir = str(base / "records")
    config.dataset.num_classes = 4
    config.dataset.synthetic.update(
        num_classes=4, image_size=64, train_per_class=6, test_per_class=2, seed=0
    )
    config.segmentation.update(method="gt", max_masks=8, skip_background=0, min_box_px=2)
    config.segmentation.shards.update(train=2, test=1)
    export.export(config, progress=False)
    return base / "records"


@pytest.fixture(scope="session")
def tiny_sam_model():
    """The tiny random SAM of ``segmentation.tiny_sam`` (real segment_anything modules)."""
    pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    from segmentation.tiny_sam import tiny_sam

    return tiny_sam()


@pytest.fixture(scope="session")
def tiny_sam2_model():
    """The tiny random SAM 2 of ``segmentation.tiny_sam`` (real sam2 modules)."""
    pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from segmentation.tiny_sam import tiny_sam2

    return tiny_sam2()


@pytest.fixture
def torch_single_thread():
    """Runs a test with one torch thread (restored after). On a small shared CPU, torch's
    default of one thread per core oversubscribes and made the tiny SAM ~10x slower."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://protomask-test``: an in-memory Cloud Storage server (gcp-storage-emulator) in
    this process, reached by every client the product uses: gcsfs (etils.epath), tensorstore
    (orbax's arrays) and google-cloud-storage (TensorBoard), and by child processes, which
    inherit the environment. Shared by the session: give each test its own prefix.

    The emulator leaves out the ``x-goog-generation`` header of a download, which tensorstore
    reads to make its next write conditional (OCDBT's manifest), so it is added here. Its
    server is single-threaded, so one client's idle keep-alive connection would stall every
    other process (a multi-process run hung on it); here each connection gets a thread and
    requests reach the store one at a time. It does not enforce write preconditions:
    concurrent writes to one object are not tested by it."""
    import socket

    server_lib = pytest.importorskip("gcp_storage_emulator.server")
    _add_generation_headers(server_lib)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_lib.create_server(
        "127.0.0.1", port, in_memory=True, default_bucket="protomask-test"
    )
    server._api = _threaded_api(server_lib, "127.0.0.1", port, server._storage)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _GCS_ENV}
    os.environ.update(
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
        GOOGLE_CLOUD_PROJECT="protomask-test",
        NO_GCE_CHECK="True",  # google-auth: no metadata server to wait for here
    )
    yield "gs://protomask-test"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


_GCS_ENV = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GOOGLE_CLOUD_PROJECT",
    "NO_GCE_CHECK",
)


def _add_generation_headers(server_lib) -> None:
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "adds_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    download.adds_generation = True
    objects.download = download  # objects.get(alt=media) calls it by this name
    for _, handlers in server_lib.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


def _threaded_api(server_lib, host, port, storage):
    """The emulator's API thread serving each connection on a thread of its own; a lock
    keeps its store's requests one at a time, as its own server does."""
    import threading
    from functools import partial
    from http.server import ThreadingHTTPServer

    lock = threading.Lock()

    def locked(method):
        def handle(self):
            with lock:  # the wait for a request line stays outside: only dispatch is serial
                method(self)

        return handle

    class Handler(server_lib.RequestHandler):
        pass

    for verb in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        name = f"do_{verb}"
        setattr(Handler, name, locked(getattr(server_lib.RequestHandler, name)))

    class API(server_lib.APIThread):
        def run(self):
            self._httpd = ThreadingHTTPServer(
                (self._host, self._port), partial(Handler, self._storage)
            )
            self._httpd.daemon_threads = True  # idle keep-alive connections do not block stop
            self.is_running.set()
            self._httpd.serve_forever()

    return API(host, port, storage, daemon=True)
