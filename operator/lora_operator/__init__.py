"""lora-operator: the kopf operator half of the project.

Importing this package must stay cheap: the trainer imports `lora_operator.api` (pydantic only),
so nothing here may import kopf, kubernetes or torch at module level.
"""

__version__ = "0.1.0"
