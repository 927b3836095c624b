"""The simulated lab: boards and instruments that listen on real ports and speak the real protocols."""
