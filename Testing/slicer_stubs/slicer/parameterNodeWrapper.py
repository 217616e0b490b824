"""Stub: the decorator returns the class unchanged; validators only record their arguments."""


def parameterNodeWrapper(cls):
    cls.__stub_wrapped__ = True
    return cls


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum
