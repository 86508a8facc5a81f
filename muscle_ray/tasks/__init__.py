"""Built-in tasks register themselves on import; see base.py for the interface."""

from muscle_ray.tasks.base import Instance, Task, get_task, register, task_names

__all__ = ["Instance", "Task", "get_task", "register", "task_names"]
