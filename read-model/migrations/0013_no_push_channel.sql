-- The push channel is gone (issue 16): the projector reads the log directly
-- from Apache Kafka, so nothing is applied ahead of its committed position.
DROP TABLE IF EXISTS projector_pushed;
