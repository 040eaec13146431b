"""Fine-tuning jobs (spec §2.13): rows for the job runner (jobs/fine_tune_run.py), which trains in a child
process and serves the result as `ft:...`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.fine_tuning import (
    AUTO,
    FineTunedModelDeleted,
    FineTuningJobCreate,
    FineTuningJobList,
    FineTuningJobObject,
    JobError,
    JobEventList,
    JobEventObject,
)
from glmstack.api.services.batches import _link_copy
from glmstack.store.fine_tuning import FineTuningJob

DEFAULTS = {"learning_rate_multiplier": 1.0, "batch_size": 8, "n_epochs": 3}  # "auto" (spec §5.4)
EXTRA_KEYS = frozenset({"max_steps", "save_every", "eval_every", "max_length", "lora_rank", "lora_alpha",
                        "pre_seq_len", "seed", "prefix_init"})
PREFIX_INITS = ("random", "data")  # P-Tuning's starting prefix (glmstack finetune --prefix-init)
METHOD_KEYS = {"lora": frozenset({"lora_rank", "lora_alpha"}), "ptuning": frozenset({"pre_seq_len", "prefix_init"})}
EVENT_PREFIX = "ftevent-"


def job_object(job: FineTuningJob) -> FineTuningJobObject:
    hp = {k: v for k, v in job.hyperparameters.items() if k != "extra"}
    return FineTuningJobObject(
        id=job.id, model=job.model, fine_tuned_model=job.fine_tuned_model, status=job.status,
        training_file=job.training_file, validation_file=job.validation_file or "", result_files=job.result_files,
        hyperparameters=hp, created_at=job.created_at, finished_at=job.finished_at,
        trained_tokens=job.trained_tokens, request_id=job.request_id,
        error=JobError(**job.error) if job.error else None)


def _not_found(job_id: str) -> PlatformError:
    # spec §9.4 item 61: 404 "fine-tuning job does not exist"
    return PlatformError(1214, f"no fine-tuning job {job_id!r}", http_status=404, field="job_id")


async def _file_blob(platform: Platform, caller: Caller, file_id: str, field: str) -> str:
    record = await run_in_threadpool(platform.store.files.get, caller.key_id, file_id)
    if record is None or record.purpose != "fine-tune":
        raise PlatformError(1214, f"no file {file_id!r} with purpose fine-tune",
                            http_status=404 if record is None else 400, field=field)
    return await run_in_threadpool(_link_copy, platform.store.blobs, record.blob)


async def create(platform: Platform, caller: Caller, body: FineTuningJobCreate) -> FineTuningJobObject:
    platform.models.resolve(body.model, caller.key_id)  # 1211: only the served model can be the base
    if body.model.startswith("ft:"):
        raise PlatformError(1214, "a fine-tuned model cannot be the base of another job", field="model")
    sent = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else {}
    hp = {name: DEFAULTS[name] if sent.get(name, AUTO) == AUTO else sent[name] for name in DEFAULTS}
    extra = body.extra_hyperparameters or {}
    unknown = set(extra) - EXTRA_KEYS
    if unknown:
        raise PlatformError(1214, f"unknown keys {sorted(unknown)}; known: {sorted(EXTRA_KEYS)}",
                            field="extra_hyperparameters")
    method = body.fine_tuning_method or "lora"
    for other, keys in METHOD_KEYS.items():  # a setting the job's method would silently ignore
        misplaced = sorted(keys & set(extra)) if other != method else []
        if misplaced:
            raise PlatformError(1214, f"{', '.join(misplaced)} apply to fine_tuning_method {other!r}, not {method!r}",
                                field="extra_hyperparameters")
    if "prefix_init" in extra and extra["prefix_init"] not in PREFIX_INITS:
        raise PlatformError(1214, f"prefix_init is one of {list(PREFIX_INITS)}", field="extra_hyperparameters")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for k, v in extra.items() if k != "prefix_init"):
        raise PlatformError(1214, "values must be positive integers (prefix_init: \"random\" or \"data\")",
                            field="extra_hyperparameters")
    if extra:
        hp["extra"] = extra
    training = await _file_blob(platform, caller, body.training_file, "training_file")
    validation = None
    try:
        if body.validation_file:
            validation = await _file_blob(platform, caller, body.validation_file, "validation_file")
        job = await run_in_threadpool(lambda: platform.store.fine_tuning.create(
            caller.key_id, model=body.model, method=method,
            training_file=body.training_file, training_blob=training, validation_file=body.validation_file or None,
            validation_blob=validation, hyperparameters=hp, suffix=body.suffix, request_id=body.request_id))
    except BaseException:
        for blob in (training, validation):
            if blob:
                platform.store.blobs.delete(blob)
        raise
    platform.jobs.wake()
    return job_object(job)


async def retrieve(platform: Platform, caller: Caller, job_id: str) -> FineTuningJobObject:
    job = await _job_by_id_or_model(platform, caller, job_id)
    return job_object(job)


async def _job_by_id_or_model(platform: Platform, caller: Caller, job_id: str) -> FineTuningJob:
    """A job id, or (spec §9.4 item 54: the documentation's cancel example) its fine-tuned model id."""
    store = platform.store.fine_tuning
    job = await run_in_threadpool(store.get, caller.key_id, job_id)
    if job is None and job_id.startswith("ft:"):
        job = await run_in_threadpool(store.by_model, caller.key_id, job_id)
    if job is None:
        raise _not_found(job_id)
    return job


async def list_jobs(platform: Platform, caller: Caller, *, after: str | None, limit: int) -> FineTuningJobList:
    jobs, has_more = await run_in_threadpool(lambda: platform.store.fine_tuning.page(caller.key_id, after=after,
                                                                                     limit=limit))
    return FineTuningJobList(data=[job_object(j) for j in jobs], has_more=has_more)


async def events(platform: Platform, caller: Caller, job_id: str, *, after: str | None,
                 limit: int) -> JobEventList:
    cursor = None
    if after is not None:
        digits = after.removeprefix(EVENT_PREFIX)
        if not digits.isdigit():
            raise PlatformError(1214, f"no event {after!r}", field="after")
        cursor = int(digits)
    found = await run_in_threadpool(lambda: platform.store.fine_tuning.events(caller.key_id, job_id, after=cursor,
                                                                              limit=limit))
    if found is None:
        raise _not_found(job_id)
    page, has_more = found
    return JobEventList(data=[JobEventObject(id=f"{EVENT_PREFIX}{e.id}", type=e.type, created_at=e.created_at,
                                             level=e.level, message=e.message, data=e.data) for e in page],
                        has_more=has_more)


async def cancel(platform: Platform, caller: Caller, job_id: str) -> FineTuningJobObject:
    job = await _job_by_id_or_model(platform, caller, job_id)
    updated = await run_in_threadpool(platform.store.fine_tuning.request_cancel, caller.key_id, job.id)
    if updated is None:
        raise _not_found(job_id)
    platform.jobs.cancel_fine_tune(job.id)
    return job_object(updated)


async def delete_job(platform: Platform, caller: Caller, job_id: str) -> FineTuningJobObject:
    job = await _job_by_id_or_model(platform, caller, job_id)
    if job.status not in ("succeeded", "failed", "cancelled"):
        raise PlatformError(1214, f"the job is {job.status}: cancel it first", field="job_id")
    await run_in_threadpool(platform.store.fine_tuning.delete, caller.key_id, job.id)
    return job_object(job)


async def delete_model(platform: Platform, caller: Caller, fine_tuned_model: str,
                       request_id: str) -> FineTunedModelDeleted:
    store = platform.store.fine_tuning
    job = await run_in_threadpool(store.by_model, caller.key_id, fine_tuned_model)
    if job is None or job.model_deleted:
        raise PlatformError(1211, http_status=404, extra=None)
    await run_in_threadpool(store.mark_model_deleted, caller.key_id, fine_tuned_model)
    unloader = getattr(platform.engine, "unload_adapter", None)
    if unloader is not None:
        result = await run_in_threadpool(unloader, fine_tuned_model)
        if hasattr(result, "__await__"):
            await result
    return FineTunedModelDeleted(request_id=request_id, model_name=fine_tuned_model, delete_status="deleted")
