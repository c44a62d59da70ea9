"""Label Studio's API as this service and its `prelabel` CLI use it: credentials, prediction writes, retries."""
