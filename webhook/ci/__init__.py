"""Cloud Infinite: the SDK client, verifying a job (DescribeMediaJob), fetching its output, submitting jobs."""
