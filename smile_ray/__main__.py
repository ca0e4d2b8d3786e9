from smile_ray.cli import entry

entry()
