// Lists the registered models of an aimass stack, then sends one Predict to a
// deployment and prints the first output tensor.
//
//   java io.aimass.examples.ListAndPredict DEPLOYMENT [INPUT_NAME] [FEATURES]
//
// Addresses come from AIMASS_REGISTRY_ADDRESS / AIMASS_ROUTING_ADDRESS
// (default localhost:7105 / localhost:7106); AIMASS_API_KEY, when set, is sent
// as the x-api-key header. The input is one row of FEATURES float32 values
// 0.1, 0.2, ... sent as raw little-endian bytes (the fast path). Exit status:
// 0 when both calls succeed, 1 on a failed call, 2 on bad arguments.
package io.aimass.examples;

import com.google.protobuf.ByteString;
import io.aimass.common.v1.InferTensor;
import io.aimass.registry.v1.ListRegisteredModelsRequest;
import io.aimass.registry.v1.ListRegisteredModelsResponse;
import io.aimass.registry.v1.RegisteredModel;
import io.aimass.registry.v1.RegistryServiceGrpc;
import io.aimass.routing.v1.PredictRequest;
import io.aimass.routing.v1.PredictResponse;
import io.aimass.routing.v1.PredictionServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.StringJoiner;
import java.util.concurrent.TimeUnit;

public final class ListAndPredict {
  private static final Metadata.Key<String> API_KEY =
      Metadata.Key.of("x-api-key", Metadata.ASCII_STRING_MARSHALLER);

  private ListAndPredict() {}

  private static String envOr(String name, String fallback) {
    String value = System.getenv(name);
    return value == null || value.isEmpty() ? fallback : value;
  }

  /** Every call carries the API key when one is configured. */
  private static <S extends io.grpc.stub.AbstractStub<S>> S withKey(S stub) {
    String key = System.getenv("AIMASS_API_KEY");
    if (key == null || key.isEmpty()) {
      return stub;
    }
    Metadata headers = new Metadata();
    headers.put(API_KEY, key);
    return stub.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
  }

  private static ManagedChannel channel(String variable, String fallback) {
    // Plaintext, as the stack serves inside its network.
    return ManagedChannelBuilder.forTarget(envOr(variable, fallback)).usePlaintext().build();
  }

  private static void listModels(ManagedChannel channel) {
    ListRegisteredModelsResponse response =
        withKey(RegistryServiceGrpc.newBlockingStub(channel))
            .withDeadlineAfter(30, TimeUnit.SECONDS)
            .listRegisteredModels(ListRegisteredModelsRequest.newBuilder().setPageSize(100).build());
    for (RegisteredModel model : response.getRegisteredModelsList()) {
      System.out.println("model " + model.getName());
    }
  }

  private static void predict(
      ManagedChannel channel, String deployment, String inputName, int features) {
    ByteBuffer row = ByteBuffer.allocate(4 * features).order(ByteOrder.LITTLE_ENDIAN);
    for (int i = 0; i < features; i++) {
      row.putFloat(0.1f * (i + 1));
    }
    PredictRequest request =
        PredictRequest.newBuilder()
            .setDeployment(deployment)
            .addInputs(
                InferTensor.newBuilder()
                    .setName(inputName)
                    .setDatatype("FP32")
                    .addShape(1)
                    .addShape(features))
            .addRawInputContents(ByteString.copyFrom(row.array()))
            .build();
    PredictResponse response =
        withKey(PredictionServiceGrpc.newBlockingStub(channel))
            .withDeadlineAfter(30, TimeUnit.SECONDS)
            .predict(request);
    if (response.getOutputsCount() == 0 || response.getRawOutputContentsCount() == 0) {
      throw new IllegalStateException("Predict returned no raw output");
    }
    InferTensor output = response.getOutputs(0);
    StringJoiner shape = new StringJoiner(",");
    for (long dim : output.getShapeList()) {
      shape.add(Long.toString(dim));
    }
    System.out.printf(
        "predict %s version=%s output=%s shape=[%s]%n",
        response.getDeployment(), response.getModelVersion(), output.getName(), shape);
    ByteBuffer raw =
        response.getRawOutputContents(0).asReadOnlyByteBuffer().order(ByteOrder.LITTLE_ENDIAN);
    StringBuilder values = new StringBuilder("values");
    while (raw.remaining() >= 4) {
      values.append(' ').append(raw.getFloat());
    }
    System.out.println(values);
  }

  public static void main(String[] args) throws InterruptedException {
    if (args.length < 1) {
      System.err.println("usage: ListAndPredict DEPLOYMENT [INPUT_NAME] [FEATURES]");
      System.exit(2);
    }
    String inputName = args.length > 1 ? args[1] : "input";
    int features = 8;
    if (args.length > 2) {
      try {
        features = Integer.parseInt(args[2]);
      } catch (NumberFormatException err) {
        features = 0;
      }
      if (features <= 0) {
        System.err.println("FEATURES must be a positive integer");
        System.exit(2);
      }
    }
    ManagedChannel registry = channel("AIMASS_REGISTRY_ADDRESS", "localhost:7105");
    ManagedChannel routing = channel("AIMASS_ROUTING_ADDRESS", "localhost:7106");
    int status = 0;
    try {
      listModels(registry);
      predict(routing, args[0], inputName, features);
    } catch (StatusRuntimeException | IllegalStateException err) {
      System.err.println("call failed: " + err.getMessage());
      status = 1;
    } finally {
      registry.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      routing.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(status);
  }
}
