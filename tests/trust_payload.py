"""A pickle payload for tests: unpickling it would write a file (nothing else)."""


def touch(path):
    with open(path, "w") as fh:
        fh.write("code ran while loading a checkpoint")
    return {}


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (touch, (self.path,))
