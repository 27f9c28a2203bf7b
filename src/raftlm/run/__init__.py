"""What a run leaves on disk: the run directory, metric trackers and the HTML report."""
