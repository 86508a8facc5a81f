"""Built-in tasks register themselves on import; see base.py for the interface.

A new task is one small module: subclass `common.FileTask`, decorate it with `@register`,
and import it below.
"""

from muscle_ray.tasks.base import Instance, Task, get_task, register, task_names
from muscle_ray.tasks import arc, dialogsum, gen_jsonl, gsm8k, hellaswag, mc_jsonl, piqa, winogrande  # noqa: F401,E402

__all__ = ["Instance", "Task", "get_task", "register", "task_names"]
