"""kopf entry: importing this package registers the handlers (`kopf run -m lora_operator.handlers`)."""

from . import kopf_handlers
