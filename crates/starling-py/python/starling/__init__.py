"""Starling's device SDK: take part in federated learning from Python.

A ``Device`` is one device's session with one task on a Starling server, saved in a folder
between steps, so a process can stop after any step and a later one goes on from there. One
contribution is four steps::

    import starling

    device = starling.Device("http://127.0.0.1:8080", "linear", "state/device-1")
    outcome = device.check_in(charging=True, idle=True, unmetered=True, battery=0.9)
    if outcome.kind == "assigned":
        device.download()
        weights = device.model()          # {"W": ndarray, "b": ndarray}, float32
        ...                               # train with NumPy, PyTorch, ...
        device.submit(weights=weights, examples=100, loss=0.05)
        device.upload()                   # Outcome(kind="delivered", ...)

API
---
``Device(server, task, state_dir, credential=None, ca_cert=None)``
    Opens, or resumes, the session saved in ``state_dir``. ``credential`` is the device's
    credential for an enrolled task (from ``enroll``); ``ca_cert`` a private CA to trust too,
    as PEM bytes or the path of a PEM file.

``device.check_in(charging=None, idle=None, unmetered=None, battery=None) -> Outcome``
    Checks in when the conditions meet the task's requirements (a condition left None is
    unknown). ``assigned`` (with ``round`` and ``round_kind``, ``"training"`` or
    ``"evaluation"``), ``wait`` (``secs``, ``reason``) or ``not_eligible`` (``reason``; nothing
    was sent).

``device.download() -> Outcome``
    Downloads the assignment's model: ``downloaded`` (``version``), or ``dropped`` when the
    model moved on first.

``device.model() -> dict[str, numpy.ndarray]``
    The downloaded model: float32 arrays keyed by tensor name, in the model's shapes.
    ``device.version`` is its version, ``device.round`` the round, ``device.round_kind``
    training or evaluation, and ``device.plan`` the task's plan (``epochs``, ``batch_size``,
    ``learning_rate``, ...) as a dict.

``device.submit(weights=None, delta=None, *, examples, loss=None) -> Outcome``
    The host's own training: exactly one of ``weights`` (the new weights) or ``delta`` (their
    difference from the downloaded model), each a dict of arrays (or array-likes) by tensor
    name; every tensor of the model, in its shape, with finite values. Checked before
    anything is sent: a bad one raises ``StarlingError`` with ``kind == "data"``. ``trained``.

``device.submit_evaluation(examples, loss, accuracy=None) -> Outcome``
    An evaluation round's score (``round_kind == "evaluation"``). ``scored``.

``device.train_csv(path, target=None) -> Outcome``
    Trains with the built-in trainer and the task's plan on a CSV file of numbers (the target
    is the last column, or ``target``: a 0-based index or a header name). ``trained``, or
    ``scored`` in an evaluation round.

``device.upload() -> Outcome``
    Sends the update or the score: ``delivered`` (``round``, ``updates_in_round``), or
    ``dropped`` (``reason``) when the round no longer takes it; the session is idle again.

``device.reset()``, ``device.step``, ``device.task``, ``device.device_id``
    Give up what is in hand; the step (``"idle"``, ``"assigned"``, ``"downloaded"``,
    ``"ready"``); the task; the device's id.

``enroll(server, task, secret, label=None, ca_cert=None) -> str``
    Enrolls in an enrolled task with its enrollment secret; answers the device's credential,
    shown this once.

``Outcome``
    ``kind`` is one of ``"assigned"``, ``"wait"``, ``"not_eligible"``, ``"downloaded"``,
    ``"trained"``, ``"scored"``, ``"delivered"``, ``"dropped"``; its fields (``round``,
    ``round_kind``, ``version``, ``examples``, ``loss``, ``accuracy``, ``secs``, ``reason``,
    ``updates_in_round``) are set for its kind and None otherwise.

``StarlingError(Exception)``
    Every failure. ``kind``: ``"refused"`` (the server refused: ``code`` is its error code
    name, e.g. ``"invalid_credential"`` or ``"missing_credential"``, and ``status`` the HTTP
    status), ``"unreachable"``, ``"tls"``, ``"protocol"``, ``"data"``, ``"state"`` (a step out
    of order, an unusable state folder), ``"train"``, ``"internal"`` (a bug: a panic in the
    Rust core arrives as this error, never as a crash). ``code`` and ``status`` are None but
    for refusals.

``starling.torch.to_state_dict(arrays)`` / ``starling.torch.from_state_dict(state_dict)``
    Between the arrays dict and a PyTorch ``state_dict`` (torch is imported only when they
    are called).

The network and training steps release the GIL while they run.
"""

from starling._native import Device, Outcome, StarlingError, __version__, enroll

__all__ = ["Device", "Outcome", "StarlingError", "enroll", "__version__"]
