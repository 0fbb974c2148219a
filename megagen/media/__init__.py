"""Turn decoded videos into files a person can look at (MP4 clips, PNG contact sheets)."""
