"""Off the serving path: the adaptation protocol runner, plots, the demo, the camera simulator and local
Kafka/Redis services for tests and the demo. `inspectd run` imports nothing from here."""
