"""Front ends of the engine: the ``lsnet`` command line (``cli``), batch mode (``batch``) and the PNG
overview picture (``overlay``).

May import every other room.  Nothing in ``lsnet`` imports this room.  ``cli`` imports the engine
inside its command functions on purpose: ``lsnet --help`` and ``lsnet info`` then start without torch.
"""
