"""dopr: behavior-cloning policies trained with DoPr and evaluated closed-loop in MuJoCo."""

__version__ = "0.1.0"
