"""Archive scoring from the attacker's side, against the real server (finding 10).

Before, ``POST /v1/datasets/{id}/score`` with an archive embedded up to 100,000 images inside the
request, each request with its own thread pools and encoder: a burst of them took the API
process's CPU and memory. Now the request checks and stores the archive and queues a job. The
server runs without a worker (``--no-worker``): the image pipeline (torch) must never be loaded
in its process, a burst of concurrent requests must leave one queued job (one job per dataset;
the rest refused, none embedding), and the server's threads must stay within one pool thread per
request in flight. (A worker running such a job: tests/test_score_jobs.py.)

Cost: about 40 s (server start, one worker start loading efficientnet-lite0 for the fit)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from apiserver import running_server, running_worker, wait_for_job
from imagedata import write_image_folder, zip_folder
from test_hostile_requests import server_pid

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
BOB = {"Authorization": f"Bearer {KEYS['bob']}"}
BURST = 16


def torch_loaded(pid: int) -> bool:
    """Whether the process has mapped torch's native library (the image pipeline)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "torch/_C" in maps


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise LookupError("Threads missing")


class ThreadPeak:
    """The most threads the process had while sampled (a side thread, until stopped)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, thread_count(pid)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, thread_count(self.pid))
            self.stop.wait(0.002)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def test_a_burst_of_archive_scorings_never_embeds_in_the_api_process(tmp_path: Path) -> None:
    # A worker is its own process here: an encoder it can load by name (offline weights, in
    # the default allow-list), not the tiny test CLIP registered in this process only.
    encoder = "efficientnet-lite0"
    images = tmp_path / "images"
    write_image_folder(images, per_class=8, size=48)
    archive = zip_folder(images)
    data_dir = tmp_path / "data"
    env = {"DIFFICULTY_POLL_SECONDS": "0.1",
           # Every request of the burst reaches the route (no 503 from the upload slots).
           "DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT": str(BURST), "DIFFICULTY_MAX_UPLOADS_PER_TENANT": str(BURST),
           "DIFFICULTY_MAX_CONCURRENT_UPLOADS": str(BURST)}
    with running_server(data_dir, api_keys=KEYS, with_worker=False, env=env) as url, \
            httpx.Client(base_url=url, headers=ALICE, timeout=120) as client:
        pid = server_pid(data_dir)
        dataset_id = client.post("/v1/datasets", json={"name": "img", "encoder": encoder}).json()["id"]
        assert client.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("a.zip", archive)}).status_code == 201
        fit = client.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1}).json()["job_id"]
        with running_worker(data_dir, env=env):
            fitted = wait_for_job(client, fit, timeout=300)
            assert fitted["state"] == "succeeded", fitted["error"]
        # No worker runs now: whatever the burst queues stays queued.
        assert not torch_loaded(pid)

        answers: list[httpx.Response] = []
        start = threading.Barrier(BURST + 1)

        def attack(headers: dict) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=120) as own:
                start.wait()
                answers.append(own.post(f"/v1/datasets/{dataset_id}/score", files={"file": ("s.zip", archive)}))

        attackers = [threading.Thread(target=attack, args=(BOB if i % 4 == 3 else ALICE,)) for i in range(BURST)]
        for thread in attackers:
            thread.start()
        baseline = thread_count(pid)
        peak = ThreadPeak(pid)
        start.wait()
        for thread in attackers:
            thread.join(120)
        most_threads = peak.close()

        statuses = sorted(a.status_code for a in answers)
        assert len(statuses) == BURST
        # Bob's requests: another tenant's dataset is a missing one. Alice's: one job per dataset.
        assert statuses.count(404) == BURST // 4
        assert statuses.count(202) == 1 and statuses.count(409) == BURST - BURST // 4 - 1, statuses
        job_id = next(a.json()["job_id"] for a in answers if a.status_code == 202)
        queued = client.get(f"/v1/jobs/{job_id}").json()
        assert queued["state"] == "queued" and queued["progress"]["done"] == 0
        # Nothing was embedded in the API process: torch never loaded, and no pools beyond one
        # thread-pool thread per request in flight.
        assert not torch_loaded(pid)
        assert most_threads <= baseline + BURST, (baseline, most_threads)

        # The queued job is Alice's alone. (That a worker runs it to the scores of the embeddings
        # path is tests/test_score_jobs.py, in-process: a second worker start here would double
        # this test's cost.)
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
        assert client.get(f"/v1/jobs/{job_id}/result", headers=BOB).status_code == 404
        assert not torch_loaded(pid)
