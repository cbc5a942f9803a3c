"""Submit a NoiseReduction job the way a team's own code does: ``ci_create_media_jobs`` in the SDK."""

from __future__ import annotations

from qcloud_cos import CosS3Client

from webhook.models import ObjectLocation


def submit_noise_reduction(
    client: CosS3Client,
    input_key: str,
    output: ObjectLocation,
    callback_url: str,
    callback_format: str = "JSON",
    user_data: str = "",
) -> str:
    """Submit a job that denoises ``input_key`` (in ``output``'s bucket) to a 16 kHz WAV; returns its JobId."""
    operation: dict[str, object] = {
        "NoiseReduction": {"Format": "wav", "SampleRate": "16000"},
        "Output": {"Region": output.region, "Bucket": output.bucket, "Object": output.key},
    }
    if user_data:
        operation["UserData"] = user_data
    answer = client.ci_create_media_jobs(
        Bucket=output.bucket,
        Jobs={
            "Tag": "NoiseReduction",
            "Input": {"Object": input_key},
            "Operation": operation,
            "CallBack": callback_url,
            "CallBackFormat": callback_format.upper(),
        },
    )
    job_id: str = answer["JobsDetail"][0]["JobId"]
    return job_id
