"""Research code kept apart from the app: nothing on the BIDS App's path imports this package."""
