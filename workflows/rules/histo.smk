# Histopathology: DCT-HistoTransformer and lightweight peers with measured compute (issue 9).
