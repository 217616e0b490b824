class VTKObservationMixin:
    def __init__(self):
        self.Observations = []
