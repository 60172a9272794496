"""The running service: ``service.py`` wires the steps of the data flow together and turns the
loop; ``housekeeping.py`` keeps the history up between its steps."""
