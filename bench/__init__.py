"""The benchmark harness behind `omniedge bench`: measurements, machine facts, report writers."""
