"""Submit a NoiseReduction job the way a team's own code does: ``ci_create_media_jobs`` in the SDK."""

from __future__ import annotations

from collections.abc import Mapping

from qcloud_cos import CosS3Client

from webhook.models import ObjectLocation


def submit_noise_reduction(
    client: CosS3Client,
    input_key: str,
    output: ObjectLocation,
    callback_url: str,
    callback_format: str | None = "JSON",
    user_data: str = "",
    *,
    template_id: str = "",
    callback_mq: Mapping[str, str] | None = None,
) -> str:
    """Submit a job that denoises ``input_key`` (in ``output``'s bucket); returns its JobId.

    The job writes a 16 kHz WAV, or what the NoiseReduction template ``template_id`` says. An empty
    ``callback_url`` leaves ``CallBack`` out, so the queue's NotifyConfig decides where CI calls
    back; ``callback_format`` None leaves ``CallBackFormat`` out (then the queue's ResultFormat, or
    XML, applies). ``callback_mq`` (``MqRegion``, ``MqMode``, ``MqName``) makes CI put the callback
    on that TDMQ queue instead (``CallBackType: TDMQ``).
    """
    operation: dict[str, object] = (
        {"TemplateId": template_id} if template_id else {"NoiseReduction": {"Format": "wav", "SampleRate": "16000"}}
    )
    operation["Output"] = {"Region": output.region, "Bucket": output.bucket, "Object": output.key}
    if user_data:
        operation["UserData"] = user_data
    jobs: dict[str, object] = {"Tag": "NoiseReduction", "Input": {"Object": input_key}, "Operation": operation}
    if callback_url:
        jobs["CallBack"] = callback_url
    if callback_mq:
        jobs["CallBackType"] = "TDMQ"
        jobs["CallBackMqConfig"] = dict(callback_mq)
    if callback_format:
        jobs["CallBackFormat"] = callback_format.upper()
    answer = client.ci_create_media_jobs(Bucket=output.bucket, Jobs=jobs)
    job_id: str = answer["JobsDetail"][0]["JobId"]
    return job_id
