"""Lightning callbacks for flexmoe, imported as ``flexmoe.callbacks``."""
