"""Django integration of backfill-operator (the ``[django]`` extra): handlers on Django's connection."""
